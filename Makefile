# memslot: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch keeps installs small; on a CUDA machine run `make TORCH=torch ...`.
TORCH ?= torch==2.13.0
MODEL_DIR ?= models/demo
STORE_DIR ?= data/store
HOST ?= 127.0.0.1
PORT ?= 50051

.PHONY: venv run test bench proto lint demo clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,gpu]"
	touch $@

venv: $(BIN)/.installed

$(MODEL_DIR)/config.json: | $(BIN)/.installed
	$(BIN)/memslot train-demo --out $(MODEL_DIR)

demo: $(MODEL_DIR)/config.json

run: $(BIN)/.installed $(MODEL_DIR)/config.json
	$(BIN)/memslot serve --model $(MODEL_DIR) --store $(STORE_DIR) --host $(HOST) --port $(PORT)

test: $(BIN)/.installed
	$(BIN)/ruff check memslot tests bench examples
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed $(MODEL_DIR)/config.json
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/service.py

proto: $(BIN)/.installed
	$(BIN)/python -m memslot.proto.build

lint: $(BIN)/.installed
	$(BIN)/ruff check memslot tests bench examples
	$(BIN)/ruff format --check memslot tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
