FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY registry registry
COPY workers workers
COPY migrations migrations
# EXTRAS=ml for workers that merge and generate, gptq to quantize, serve for `registry serve` (FastAPI, uvicorn
# and Jinja2; no torch); empty for a pull-only image. Several at once: EXTRAS=serve,gptq.
ARG EXTRAS=gptq
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
# `registry serve --host 0.0.0.0 --port 8000` (docker-compose.yml's serve service).
EXPOSE 8000
ENTRYPOINT []
CMD ["registry", "worker"]
