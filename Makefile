# principal-propagation — every set-up step lives here, so a fresh machine needs only
# `make run` (the embedded demo) or `make test` (everything a change must pass).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
WASM        := target/wasm32-wasip1/release/principal_propagation.wasm
# wasm-bindgen-cli must match the wasm-bindgen crate in Cargo.lock exactly.
WASM_BINDGEN_VERSION := $(shell awk '/^name = "wasm-bindgen"$$/ {getline; gsub(/[^0-9.]/, ""); print}' Cargo.lock)
CARGO_BIN   := $(HOME)/.cargo/bin
export PATH := $(CARGO_BIN):$(PATH)

.PHONY: help setup build image pp keys renew regenerate rotate run test test-unit test-wasm test-e2e test-alerts lint bench soak fuzz difftest clean

help:
	@echo "make run    - build, install what is missing, start the demo on 127.0.0.1 (Ctrl-C stops)"
	@echo "make test   - lint, unit tests, core under wasm (Node), alert rules (promtool), end-to-end tests in real Envoy"
	@echo "make build  - build $(WASM)"
	@echo "make image  - the plugin as an OCI image (target/oci, tag IMAGE_TAG = the crate's version)"
	@echo "make pp     - build the operator's command target/release/pp (pp --help)"
	@echo "make keys   - create the demo's missing signing keys in .run/keys (BITS=2048|3072)"
	@echo "make renew SLOT=a|b|second       - new certificate (2 years) for the same key"
	@echo "make regenerate SLOT=a|b|second  - new key and certificate"
	@echo "make rotate - swap active and passive key of the running demo, without a restart"
	@echo "make difftest - RSA CRT and P-256 signers against the rsa and p256 crates on DIFFTEST_KEYS=10000 fresh keys each,"
	@echo "                 and the RSA one on DIFFTEST_KEYS_4096=500 fresh 4096-bit keys"
	@echo "make bench  - measure against peers side by side in one Envoy, write BENCHMARKS.md"
	@echo "make soak   - ten minutes of load with user churn and token expiry (SOAK_SECONDS), write SOAK.md"
	@echo "make fuzz   - run every cargo-fuzz target for FUZZ_SECONDS (default 60), growing fuzz/corpus"

## Installation (idempotent) ---------------------------------------------------------

setup: .make/rust-targets $(VENV)/.installed .make/xmlsec1

.make/rust-targets:
	@mkdir -p .make
	rustup target add wasm32-wasip1 wasm32-unknown-unknown
	rustup component add clippy rustfmt
	@touch $@

$(VENV)/.installed: dev/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r dev/requirements.txt
	@touch $@

.make/xmlsec1:
	@mkdir -p .make
	@command -v xmlsec1 >/dev/null && command -v openssl >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq xmlsec1 openssl >/dev/null; }
	xmlsec1 --version
	@touch $@

# skopeo and a registry (Debian's docker-registry): the image test pushes and pulls back.
.make/oci-tools:
	@mkdir -p .make
	@command -v skopeo >/dev/null && command -v docker-registry >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq skopeo docker-registry >/dev/null; }
	skopeo --version
	@touch $@

# promtool (Debian's prometheus package) checks and unit-tests the alert rules.
.make/promtool:
	@mkdir -p .make
	@command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq prometheus >/dev/null; }
	promtool --version | head -1
	@touch $@

# The SAP Cloud SDK for JavaScript (tests/sdk), at the exact versions of its lock file:
# an application that reads destinations through the gateway's find-destination API.
.make/sdk-node: tests/sdk/package.json tests/sdk/package-lock.json
	@mkdir -p .make
	npm ci --prefix tests/sdk --no-audit --no-fund
	@touch $@

.make/wasm-bindgen-$(WASM_BINDGEN_VERSION):
	@mkdir -p .make
	@if [ "$$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $$2}')" != "$(WASM_BINDGEN_VERSION)" ]; then \
	  cargo install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION); fi
	@touch $@

## Build and run -------------------------------------------------------------------

build: .make/rust-targets
	cargo build --release --target wasm32-wasip1 --lib

# The plugin as an OCI image (Wasm image spec, compat variant) in target/oci, for
# Istio's WasmPlugin and Envoy Gateway; push it with skopeo (see the README).
IMAGE_TAG ?= $(shell awk -F'"' '/^version = / {print $$2; exit}' Cargo.toml)
image: build $(VENV)/.installed
	$(PY) dev/oci_image.py --wasm $(WASM) --out target/oci --tag $(IMAGE_TAG)

PP      := target/release/pp
PP_KEYS := $(PP) keys
BITS    ?= 2048
ISSUER  ?= principal-propagation-gateway
KEY_DIR := .run/keys

$(PP): $(wildcard src/*.rs src/*/*.rs src/bin/*/*.rs) Cargo.toml
	cargo build --release --bin pp

# The operator's command `pp` (keys, assertion): target/release/pp.
pp: $(PP)

keys: $(PP)
	@mkdir -p $(KEY_DIR)
	@for slot in a b second; do \
	  [ -f $(KEY_DIR)/$$slot-key.pem ] || $(PP_KEYS) generate --issuer "$(ISSUER)" --bits $(BITS) \
	    --key $(KEY_DIR)/$$slot-key.pem --cert $(KEY_DIR)/$$slot-cert.pem; done
	@[ -f $(KEY_DIR)/ec-key.pem ] || $(PP_KEYS) generate --issuer "$(ISSUER)" --algorithm ec \
	    --key $(KEY_DIR)/ec-key.pem --cert $(KEY_DIR)/ec-cert.pem

renew: $(PP)
	$(PP_KEYS) renew --key $(KEY_DIR)/$(SLOT)-key.pem --cert $(KEY_DIR)/$(SLOT)-cert.pem

regenerate: $(PP)
	$(PP_KEYS) generate --issuer "$(ISSUER)" --bits $(BITS) --key $(KEY_DIR)/$(SLOT)-key.pem --cert $(KEY_DIR)/$(SLOT)-cert.pem

rotate:
	$(PY) dev/stack.py rotate --profile demo

run: setup build keys
	$(PY) dev/stack.py run --profile demo

## Tests ---------------------------------------------------------------------------

test: lint test-unit test-wasm test-alerts test-e2e

lint: .make/rust-targets
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 --lib -- -D warnings

test-unit:
	cargo test

# The alert rules: valid, and firing (or not) as their tests expect.
test-alerts: .make/promtool
	promtool check rules envoy/prometheus-rules.yaml
	promtool test rules tests/prometheus/rules_test.yaml

test-wasm: .make/rust-targets .make/wasm-bindgen-$(WASM_BINDGEN_VERSION)
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  cargo test --target wasm32-unknown-unknown --test wasm_core

# Envoy at trace level, and every stack's log searched for the run's secrets (dev/log_audit.py).
test-e2e: setup build keys .make/oci-tools .make/sdk-node
	PP_ENVOY_LOG_LEVEL=trace PP_AUDIT_LOGS=1 $(PY) -m pytest -q tests/dev tests/k8s tests/e2e

## Signer differential tests at scale (`cargo test` runs them on ~300 keys each) ----------

DIFFTEST_KEYS      ?= 10000
# 4096-bit keys: a fresh 2048-bit prime takes about 0.5 s of CPU (the default's 1,014:
# about 5 minutes on both cores, once, kept for reruns); the comparison about 40 ms a key.
DIFFTEST_KEYS_4096 ?= 500
# 1% spare pairs: a pair whose p - 1 or q - 1 shares a factor with 65537 makes no key.
difftest_pairs        = $(shell echo $$(( $(1) + $(1) / 100 + 2 )))
DIFFTEST_PRIMES      := target/difftest/primes-1024-$(call difftest_pairs,$(DIFFTEST_KEYS))-pairs.txt
DIFFTEST_PRIMES_4096 := target/difftest/primes-2048-$(call difftest_pairs,$(DIFFTEST_KEYS_4096))-pairs.txt

# target/difftest/primes-<bits>-<pairs>-pairs.txt: two fresh OpenSSL primes of <bits> per
# pair (1024 bits: about 70 ms each; both cores), kept for reruns.
target/difftest/primes-%-pairs.txt:
	@mkdir -p $(@D)
	bits=$(word 1,$(subst -, ,$*)); pairs=$(word 2,$(subst -, ,$*)); \
	  seq $$((2 * pairs)) | xargs -P 2 -n 50 sh -c 'for i; do openssl prime -generate -bits '$$bits' -hex; done' _ > $@.tmp
	mv $@.tmp $@

difftest: $(DIFFTEST_PRIMES) $(DIFFTEST_PRIMES_4096)
	PP_DIFFTEST_PRIMES=$(DIFFTEST_PRIMES) PP_DIFFTEST_KEYS=$(DIFFTEST_KEYS) \
	  cargo test --profile difftest --test rsa_difftest -- --nocapture
	PP_DIFFTEST_PRIMES=$(DIFFTEST_PRIMES_4096) PP_DIFFTEST_KEYS=$(DIFFTEST_KEYS_4096) \
	  cargo test --profile difftest --test rsa_difftest -- --nocapture
	PP_DIFFTEST_SEED=$$(od -An -N8 -tu8 /dev/urandom | tr -d ' ') PP_DIFFTEST_KEYS=$(DIFFTEST_KEYS) \
	  cargo test --profile difftest --test ecdsa_difftest -- --nocapture

## Benchmarks (not tests: no timing is asserted anywhere in `make test`) ------------

MINIMAL_WASM := target/wasm32-wasip1/release/examples/minimal_filter.wasm

.make/wrk:
	@mkdir -p .make
	@command -v wrk >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk >/dev/null; }
	@touch $@

bench: setup build keys .make/wrk
	cargo build --release --target wasm32-wasip1 --example minimal_filter --example sign_bench --example hit_bench
	$(PY) bench/bench.py

SOAK_SECONDS ?= 600

## Fuzzing (not part of `make test`, which replays fuzz/corpus and fuzz/regressions) -----

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs)))
# cargo-fuzz needs nightly flags: the nightly toolchain if there is one, else stable
# with RUSTC_BOOTSTRAP (the sanitizer runtime ships with stable too).
FUZZ_CARGO := $(shell rustup run nightly rustc --version >/dev/null 2>&1 && echo "cargo +nightly" || echo "RUSTC_BOOTSTRAP=1 cargo")

.make/cargo-fuzz:
	@mkdir -p .make
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
	@touch $@

fuzz: .make/cargo-fuzz
	$(FUZZ_CARGO) fuzz build -O -a
	@for target in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/regressions/$$target; \
	  $(FUZZ_CARGO) fuzz run -O -a $$target fuzz/corpus/$$target -- -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=fuzz/regressions/$$target/ -print_final_stats=1 2>&1 \
	    | grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss|==|SUMMARY|Done)" ; \
	  status=$${PIPESTATUS[0]}; [ $$status = 0 ] || { echo "$$target: crash saved in fuzz/regressions/$$target"; exit $$status; }; \
	  $(FUZZ_CARGO) fuzz cmin -O -a $$target fuzz/corpus/$$target 2>&1 | grep -E "MERGE-OUTER: [0-9]+ new files" ; \
	done

soak: setup build keys
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) bench/soak.py

clean:
	cargo clean
	rm -rf .run .make $(VENV) tests/sdk/node_modules
