# alitok: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
RUN ?= runs/demo
INCEPTION ?=

.PHONY: install test test-slow demo bench clean

# torch first: a wheel your pip already has locally (no download) if there is one, else the index.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q --no-index --no-deps torch 2>/dev/null || true
	$(PIP) install -q -r requirements.txt

test: install
	$(PYTHON) -m pytest -q test_alitok.py

test-slow: install
	$(PYTHON) -m pytest -q -m slow test_alitok.py

demo: install
	$(PYTHON) demo.py --out $(RUN) $(if $(INCEPTION),--inception $(INCEPTION))

bench: install
	$(PYTHON) bench.py

clean:
	rm -rf runs .pytest_cache __pycache__
