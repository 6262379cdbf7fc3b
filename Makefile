# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; pip finds it on this machine's disk (elsewhere it comes from PyPI).
TORCH_SPEC ?= torch==2.13.0
DEMO_HOME ?= demo-home

OLAH_VENV ?= .olah-venv

.PHONY: venv test demo bench-verify bench-pull bench-merge bench-quantize bench-convert bench-startup bench-daemon bench-serve clean services test-deps

$(BIN)/registry: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}" $(BIN)/pip install -q -e '.[test,gptq,serve,gguf]'
	touch $(BIN)/registry

venv: $(BIN)/registry

services:
	bash tests/services.sh

# The HF-compatible test server (olah) lives in its own venv so its dependencies stay apart from ours;
# git-lfs lets the tests build a repository whose weights are LFS files.
$(OLAH_VENV)/bin/olah-cli:
	$(PYTHON) -m venv $(OLAH_VENV)
	$(OLAH_VENV)/bin/pip install -q olah

# strace lets a test check which paths the store fsyncs.
test-deps: $(OLAH_VENV)/bin/olah-cli
	command -v git-lfs >/dev/null || (apt-get update -q && apt-get install -y -q git-lfs) || \
	  (echo "install git-lfs for the LFS pull test" >&2; exit 1)
	command -v strace >/dev/null || (apt-get update -q && apt-get install -y -q strace) || \
	  (echo "install strace for the fsync test" >&2; exit 1)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) || \
	  (echo "install chromium for the web page tests" >&2; exit 1)
	command -v docker-compose >/dev/null || (apt-get update -q && apt-get install -y -q docker-compose) || \
	  (echo "install docker-compose to validate docker-compose.yml" >&2; exit 1)

# GPTQModel wants to know how many CPU workers it may use; a 2-core machine needs 2.
# Two pytest processes (pytest-xdist): most tests wait on subprocesses and servers, so two keep 2 cores busy
# (about 15 min instead of 22-26 here); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: venv test-deps services
	GPTQMODEL_CPU_WORKERS=$${GPTQMODEL_CPU_WORKERS:-$$(nproc)} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25

demo: venv
	rm -rf $(DEMO_HOME) demo-model demo-export
	$(BIN)/python tests/tinymodel.py demo-model
	REGISTRY_HOME=$(DEMO_HOME) $(BIN)/registry init
	REGISTRY_HOME=$(DEMO_HOME) $(BIN)/registry import demo-model --name tiny-llama
	REGISTRY_HOME=$(DEMO_HOME) $(BIN)/registry tag tiny-llama tiny-llama:demo
	REGISTRY_HOME=$(DEMO_HOME) $(BIN)/registry verify tiny-llama:demo
	REGISTRY_HOME=$(DEMO_HOME) $(BIN)/registry export tiny-llama:demo demo-export
	cd demo-export && REGISTRY_HOME=$(abspath $(DEMO_HOME)) $(abspath $(BIN))/registry manifest tiny-llama --format sha256sum | sha256sum -c
	$(BIN)/python -c "from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('demo-export'); print('loaded', type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')"
	REGISTRY_HOME=$(DEMO_HOME) $(BIN)/registry list

bench-verify: venv
	$(BIN)/python bench/verify.py

bench-pull: venv test-deps
	$(BIN)/python bench/pull.py

bench-merge: venv
	$(BIN)/python bench/merge.py

bench-quantize: venv
	$(BIN)/python bench/quantize.py

# `registry convert --outtype q8_0` against llama.cpp's converter run directly on the same exported model.
bench-convert: venv
	$(BIN)/python bench/convert.py

bench-startup: venv
	$(BIN)/python bench/startup.py

# Idle CPU, job pickup latency and 1,000 jobs through `registry daemon --workers 4`, on SQLite and PostgreSQL.
bench-daemon: venv services
	$(BIN)/python bench/daemon.py

# `registry serve` against a static file server (snapshot_download of a 2 GiB model), 16 clients at once, and API
# latency at 10,000 artifacts on SQLite and PostgreSQL.
bench-serve: venv services
	$(BIN)/python bench/serve.py --backend both

clean:
	rm -rf $(VENV) $(OLAH_VENV) $(DEMO_HOME) demo-model demo-export bench/out
