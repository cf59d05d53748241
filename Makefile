# The README's two commands: `make train` and `make test`. Both set up .venv first when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
PIP     := $(BIN)/pip
CONFIG  ?= configs/sam2_t.py
WORKDIR ?= workdir/sam2_t

.PHONY: setup lint test test-slow train table2 bench clean

setup: $(STAMP)

# torch==2.13.0 first (a local CPU build here; a bare `torch` would pull a multi-GB CUDA build),
# then sam2==1.1.0 built against it without isolation (its build imports torch), then the project.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[convert,test]'
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation --no-deps sam2==1.1.0
	$(BIN)/python -c "import jax, flax, torch, sam2; print('setup ok: jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

train: setup
	$(BIN)/python train.py --config $(CONFIG) --workdir $(WORKDIR)

# The paper's Table 2 in miniature (benchmarks/table2_mini.py): SAM 2 fine-tuned vs SafeClick, same encoder.
table2: setup
	$(BIN)/python benchmarks/table2_mini.py $(TABLE2_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_sam2.py

clean:
	rm -rf $(VENV) workdir
