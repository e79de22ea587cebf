# alitok: `make demo` sets up and runs the whole pipeline on the CPU; `make test` runs the tests.
PYTHON ?= python3
RUN ?= runs/demo
DATA ?= shapes
ABLATION ?= runs/ablation
JOBS ?= $(shell $(PYTHON) -c "import os; print(os.cpu_count() or 1)")
# Inside a virtualenv or conda environment we use it and install only what is missing. Outside one we make
# our own in .venv: Debian's and Ubuntu's system Python refuse `pip install` (PEP 668, externally managed).
IN_ENV := $(shell $(PYTHON) -c "import os, sys; print(int(sys.prefix != sys.base_prefix or 'CONDA_PREFIX' in os.environ))")
PY := $(if $(filter 1,$(IN_ENV)),$(PYTHON),.venv/bin/python)

.PHONY: install test test-slow demo ablation bench memory reproduce reproduce-tokenizer clean

.venv/bin/python:
	$(PYTHON) -m venv .venv || { echo "could not create .venv: install your Python's venv module (Debian/Ubuntu: apt install python3-venv) or run make inside an environment of your own"; exit 1; }

# torch first from a wheel already on this machine if pip knows one (no multi-GB download), then the rest with
# torch held at the installed version; nothing at all when everything imports already.
TORCH_PIN = $$($(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" 2>/dev/null)
install: $(if $(filter 1,$(IN_ENV)),,.venv/bin/python)
	@$(PY) -c "import torch, numpy, PIL, scipy, tqdm, pytest" 2>/dev/null || { \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-index --no-deps torch 2>/dev/null; \
	  $(PY) -m pip install -q -r requirements.txt $(TORCH_PIN); }

test: install
	$(PY) -m pytest -q test_alitok.py

test-slow: install
	$(PY) -m pytest -q -m slow test_alitok.py

demo: install
	$(PY) tools/demo.py --out $(RUN)

# The tokenizer ablation (bidirectional and alitok x 5 seeds, each stage 1 -> stage 2 -> generator;
# paired differences with 95% intervals), resumable:
# make ablation DATA=../shared/datasets/cifar10_subset_32.npz (JOBS runs at once, default: one per core)
ablation: install
	$(PY) tools/ablation.py --data $(DATA) --out $(ABLATION) --jobs $(JOBS)

# One row of the paper's table from the released files, with runs/reproduce_<MODEL>/reproduce.json (resumable):
# make reproduce MODEL=B|L|XL [GENERATOR=alitok_b.bin TOKENIZER=AliTok.pth REF=VIRTUAL_imagenet256_labeled.npz GPUS=8]
MODEL ?= B
GENERATOR ?= alitok_$(shell echo $(MODEL) | tr A-Z a-z).bin
TOKENIZER ?= AliTok.pth
REF ?= VIRTUAL_imagenet256_labeled.npz
IMAGES ?= imagenet/val
GPUS ?= 1
LAUNCH = $(if $(filter 1,$(GPUS)),$(PY),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(GPUS))
reproduce: install
	$(LAUNCH) tools/reproduce.py --model $(MODEL) --generator $(GENERATOR) --tokenizer $(TOKENIZER) --ref $(REF) \
	    --out runs/reproduce_$(MODEL)

# The tokenizer's rFID / PSNR / codebook usage on ImageNet val (IMAGES: a folder or an npz)
reproduce-tokenizer: install
	$(PY) tools/reproduce.py --tokenizer-only --tokenizer $(TOKENIZER) --images $(IMAGES) --out runs/reproduce_tokenizer

bench: install
	$(PY) tools/bench.py
	$(PY) tools/memory_plan.py

# GPU memory per training stage and preset, measured on the CPU (minutes): the --micro-batch for 80 and 141 GB
memory: install
	$(PY) tools/memory_plan.py

clean:
	rm -rf runs .pytest_cache __pycache__
