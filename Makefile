# Every target installs what it needs on first use (a fresh machine needs only python3).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT := out

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this machine carries a CPU build of 2.13.0; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check vlmexport tests bench examples

demo: $(STAMP)
	rm -rf $(OUT)/shapes-merged
	$(VENV)/bin/vlmexport merge --model-dir examples/shapes/model --output-dir $(OUT)/shapes-merged
	$(VENV)/bin/vlmexport caption --backend torch --model-dir $(OUT)/shapes-merged examples/shapes/images/000.png examples/shapes/images/001.png examples/shapes/images/002.png

bench: $(STAMP)
	$(PY) bench/export_bench.py

clean:
	rm -rf $(OUT) .pytest_cache
