# The README's two commands: `make train` and `make test`. Both set up .venv first when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
PIP     := $(BIN)/pip
CONFIG  ?= configs/sam2_t.py
WORKDIR ?= workdir/sam2_t

.PHONY: setup host-deps lint test test-slow train pretrain standin-results table2 bench clean app app-setup browser-deps screenshot

setup: $(STAMP)

# torch==2.13.0 first (a local CPU build here; a bare `torch` would pull a multi-GB CUDA build),
# then sam2==1.1.0 built against it without isolation (its build imports torch), then the project.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[convert,test]'
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation --no-deps sam2==1.1.0
	@$(MAKE) --no-print-directory host-deps
	$(BIN)/python -c "import jax, flax, torch, sam2; print('setup ok: jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

# jemalloc, the programs' host allocator (safeclick_jax/host_memory.py): Debian's libjemalloc2, with
# apt-get when root; optional (without it, glibc's huge-page malloc).
host-deps:
	@if $(PY) -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('jemalloc') is None)"; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 \
	  || echo "host-deps: libjemalloc2 not installed; glibc's malloc is used"; \
	else echo "host-deps: no jemalloc (Debian: apt-get install libjemalloc2); glibc's malloc is used"; fi

# The web app's JavaScript (niivue) from safeclick_jax/app/web/package-lock.json.
APP_WEB := safeclick_jax/app/web
APP_STAMP := $(APP_WEB)/node_modules/.npm-ci-done
app-setup: $(APP_STAMP)
$(APP_STAMP): $(APP_WEB)/package.json $(APP_WEB)/package-lock.json
	cd $(APP_WEB) && npm ci --no-audit --no-fund
	touch $(APP_STAMP)

# Headless Chromium + chromedriver for the browser test (Debian packages; apt-get when root).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "browser-deps: install the Debian packages chromium and chromium-driver (as root)"; exit 1; fi

# The demo (demo.py): the model `make train` exports (trained first when absent) and an example CT;
# the first line says which encoder the demo model builds on (safeclick_jax/standin.py).
app: setup app-setup
	$(BIN)/python -m safeclick_jax.standin $(WORKDIR)/export
	$(BIN)/python demo.py $(APP_ARGS)

# The README's picture of the page: the browser test on the demo model (`make train` first when absent).
screenshot: setup app-setup browser-deps
	APP_SCREENSHOT=docs/images/app.png $(BIN)/python -m pytest -q tests/test_app_browser.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup app-setup browser-deps
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

train: setup
	$(BIN)/python train.py --config $(CONFIG) --workdir $(WORKDIR)

# The stand-in SAM 2 (pretrain.py, configs/standin.py): sam2.1 tiny from random weights on procedural
# data, an image phase and a clip phase, then its zero-shot quality; workdir/standin/export, which
# train, table2, app and evaluate.py then start from (safeclick_jax/standin.py).
pretrain: setup
	$(BIN)/python pretrain.py $(PRETRAIN_ARGS)

# What the stand-in gives, after `make pretrain` (benchmarks/standin_results.py): the demo's 3D Dice,
# Table 2 in miniature on its frozen encoder, the interactive protocol with four models, in
# benchmarks/results/standin/summary.md. STANDIN_ARGS=--all: table2 on seed 1 and held-out data too.
standin-results: setup
	$(BIN)/python benchmarks/standin_results.py $(STANDIN_ARGS)

# The paper's Table 2 in miniature (benchmarks/table2_mini.py): SAM 2 fine-tuned vs SafeClick, same encoder.
table2: setup
	$(BIN)/python benchmarks/table2_mini.py $(TABLE2_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_sam2.py

clean:
	rm -rf $(VENV) workdir
