# One place for every knob: override on the command line, e.g. `make train MODEL=mlp300 EPOCHS=5`.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
MODEL       ?= cnn
DATASET     ?= mnist
OUTPUT_DIR  ?= runs
TRAIN_ARGS  ?=
PYTEST_ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install train test bench data clean

install: $(VENV)/.installed $(FASHION_MNIST)/train-images-idx3-ubyte.gz

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Fashion-MNIST's offline copy comes from Debian's dataset-fashion-mnist (needs root, as in CI and the image).
$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	apt-get install -y --no-install-recommends dataset-fashion-mnist >/dev/null \
	  || (apt-get update -qq && apt-get install -y --no-install-recommends dataset-fashion-mnist >/dev/null)

data: install
	$(PY) -m trainer data

train: install
	$(PY) -m trainer train --model $(MODEL) --dataset $(DATASET) --output-dir $(OUTPUT_DIR) $(TRAIN_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
