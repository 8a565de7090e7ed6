# Eden's verbs. `make demo` and `make test` each do all their own set-up on a fresh machine.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Build products live outside the clone so that fresh clones (and CI) reuse them.
EDEN_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/eden
export EDEN_CACHE_DIR
export CARGO_TARGET_DIR ?= $(EDEN_CACHE_DIR)/target
export CARGO_TERM_COLOR ?= never

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help deps control-plane crds check-crds lint test demo bench

help:
	@echo "make demo   run Eden end to end on a local control plane and two redis-servers"
	@echo "make test   the whole suite: format, lint, CRDs up to date, unit and end-to-end tests"
	@echo "make bench  benchmarks; results go to BENCHMARKS.md"
	@echo "make crds   regenerate crds/ from the Rust types"

# Debian's redis-server and redis-tools, when missing.
deps:
	@if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then \
	  echo "installing redis-server and redis-tools from Debian packages"; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server redis-tools >/dev/null; \
	  $(SUDO) systemctl disable --now redis-server >/dev/null 2>&1 || true; \
	fi
	@command -v kubectl >/dev/null || { echo "kubectl is required on PATH"; exit 1; }

# etcd + kube-apiserver v1.33, built once per source version into $(EDEN_CACHE_DIR)/bin.
control-plane:
	@bash e2e/control-plane/build.sh >/dev/null

# The chart carries its own copy of the CRDs (Helm installs charts/eden/crds/ before templates).
crds:
	cargo run -q -p eden-operator --bin crdgen > crds/eden.yaml
	cp crds/eden.yaml charts/eden/crds/eden.yaml

check-crds:
	@cargo run -q -p eden-operator --bin crdgen | diff -u crds/eden.yaml - \
	  || { echo "crds/eden.yaml is stale: run 'make crds'"; exit 1; }
	@diff -u crds/eden.yaml charts/eden/crds/eden.yaml \
	  || { echo "charts/eden/crds/eden.yaml is stale: run 'make crds'"; exit 1; }

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings

test: deps control-plane lint check-crds
	cargo test --workspace

demo: deps control-plane
	cargo build -q --bins -p eden-operator -p eden-sidecar -p eden-e2e
	"$(CARGO_TARGET_DIR)/debug/eden-demo"

# The sidecar against direct Redis, HAProxy and twemproxy, in one run; results go to BENCHMARKS.md.
# bench/proxy.py installs haproxy and nutcracker (Debian packages) when missing. A sidecar that does
# not build is still reported (its row says so) and then fails the target.
bench: deps
	@built=0; cargo build -q --release -p eden-sidecar --bin eden-sidecar || built=$$?; \
	python3 bench/proxy.py $$([ $$built = 0 ] || echo --sidecar-build-failed) \
	  "$(CARGO_TARGET_DIR)/release/eden-sidecar"; \
	exit $$built
