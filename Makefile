# qpc: every target bootstraps .venv from nothing (python3 -m venv + pip install).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PLUGIN_DIRS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP  := $(VENV)/.installed
JS_DIR := plugins/ws_bridge/js
# The browser OPAQUE client the ws_bridge plugin serves (scripts/build-js.sh, npm).
OPAQUE_JS := plugins/ws_bridge/qpc_ws_bridge/static/qpc-opaque.js
CONFIG ?= qpc-server.example.toml

.PHONY: install run test bench lint proto clean system-deps

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) scripts/system-deps.sh
	bash scripts/system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' $(foreach d,$(PLUGIN_DIRS),-e $(d))
	touch $(STAMP)

$(OPAQUE_JS): $(JS_DIR)/package.json $(JS_DIR)/package-lock.json $(JS_DIR)/src/opaque.js scripts/build-js.sh
	bash scripts/build-js.sh

# install / run go on without npm (the bridge then says the file is missing); test needs it.
install: $(STAMP)
	@$(MAKE) --no-print-directory $(OPAQUE_JS) || echo "warning: qpc-opaque.js not built (needs npm, Node.js 18+): browsers cannot log in with a password" >&2

system-deps:
	bash scripts/system-deps.sh

run: install
	$(BIN)/qpc run --config $(CONFIG)

test: $(STAMP) $(OPAQUE_JS)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy qpc_core $(filter-out %.egg-info,$(wildcard $(addsuffix qpc_*,$(PLUGIN_DIRS)))) bench

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info plugins/*/*.egg-info
