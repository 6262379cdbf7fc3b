FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY registry registry
COPY workers workers
COPY migrations migrations
# EXTRAS=ml for workers that merge and generate, gptq to quantize; empty for a catalog or pull-only image.
ARG EXTRAS=gptq
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
ENTRYPOINT []
CMD ["registry", "worker"]
