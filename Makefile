# Two commands set up everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines get the CPU build that lies on disk; an importable torch (e.g. a cluster's CUDA
# build inside an existing environment) is left alone.
TORCH_CPU_PIN ?= torch==2.13.0
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed JIT-builds a small CPU op at start-up; keep its build cache in this clone's venv, so clones
# and venvs never rebuild over each other or wait on another one's stale build lock (~/.cache is shared).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv test test-slow train plan bench bench-sweep bench-models gpu-check gpu-wheels lint clean

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU_PIN)"
	$(PY) -m pip install -q -e ".[hf,app,dev]"
	@# On a CPU machine DeepSpeed JIT-builds its shared-memory all-reduce op at the first start-up
	@# (about a minute); build it here, once, into TORCH_EXTENSIONS_DIR.
	if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then \
		DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"; fi
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -m "not slow" tests

# The full fault sweeps (kills at every step of save, rotation, export and conversion; every cache
# file damaged; many concurrent jobs): the sample of each runs in `make test`.
test-slow: venv
	$(PY) -m pytest -q -m slow tests

# The reference MoE-GPT on 2 local processes (CPU: gloo; GPUs: NCCL), experts split over both.
# Extra Hydra overrides: make train ARGS="train.steps=1000 moe.capacity_factor=2.0"
NPROC  ?= 2
PORT   ?= 29531
train: venv
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --master_port $(PORT) launch/train.py +experiment=cpu_demo $(ARGS)

# Plan a run before it queues (launch/plan.py): per-rank memory, traffic and the best layouts.
# The same Hydra overrides as train, then planner flags: make plan PLAN_ARGS="model=hf model.path=/models/X --gpus 64 --gpu-memory 80GiB --search"
PLAN_ARGS ?= model=medium data.seq_len=2048 --search --gpus 16 --gpu-memory 80GiB
plan: venv
	$(PY) launch/plan.py $(PLAN_ARGS)

# Our MoE vs DeepSpeed's vs the GEMM floor, written to BENCHMARKS.md's results block. Options:
# make bench BENCH_ARGS="--configs c2 --reps 15"; on a GPU: BENCH_ARGS="--device cuda" (bf16). The tools
# behind it: benchmarks/bench_moe.py --help.
bench: venv
	$(PY) benchmarks/bench_moe.py $(BENCH_ARGS)

# The sampled shape sweep: ours and the drop-in against DeepSpeed at 35+ shapes, about 15 minutes on a
# small CPU; writes the sweep block of BENCHMARKS.md.
SWEEP_ARGS ?= --reps 8 --warmup 1
bench-sweep: venv
	$(PY) benchmarks/bench_moe.py --sweep $(SWEEP_ARGS)

# Whole HF models (tiny Mixtral and Qwen3-MoE) trained by our app vs DeepSpeed AutoEP, eager and compiled,
# EP=1 and EP=2: benchmarks/bench_models.py. AutoEP runs in its own venv (AUTOEP_VENV, git-ignored), since
# it needs transformers 5.15; built here on first use, the main venv untouched.
# Options: make bench-models MODELS_ARGS="--quick" or MODELS_ARGS="--families mixtral --rounds 3 --steps 8"
AUTOEP_VENV ?= .venv-autoep
MODELS_ARGS ?=
$(AUTOEP_VENV)/.installed:
	test -x $(AUTOEP_VENV)/bin/python || $(PYTHON) -m venv $(AUTOEP_VENV)
	$(AUTOEP_VENV)/bin/python -m pip install -q "$(TORCH_CPU_PIN)"
	$(AUTOEP_VENV)/bin/python -m pip install -q deepspeed==0.19.8 transformers==5.15.1 "tokenizers>=0.22,<0.23" \
		"huggingface-hub<2" safetensors numpy
	touch $@

bench-models: venv $(AUTOEP_VENV)/.installed
	$(PY) benchmarks/bench_models.py --peer-python $(AUTOEP_VENV)/bin/python $(MODELS_ARGS)

# One prepared GPU check (README, "GPU check"): tests, benchmark, training, one results file in
# GPU_OUT; without CUDA a dry run at tiny shapes on the CPU. Wheels for a lent machine: scripts/gpu_wheels.py.
GPU_OUT ?= runs/gpu-check
gpu-check: venv
	bash scripts/gpu_check.sh $(GPU_OUT)

# The wheels a lent H200 lacks, into .whl/ (git-ignored), and the offline proof that they install there.
gpu-wheels: venv
	$(PY) scripts/gpu_wheels.py

# docs/config.md: every Hydra key and config option, generated from launch/config.py and conf/.
.PHONY: docs
docs: venv
	$(PY) -m launch.config_reference --write

lint: venv
	$(VENV)/bin/ruff check moe_parallel launch tests benchmarks scripts
	$(VENV)/bin/ruff format --check moe_parallel launch tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
