# Eden's verbs. `make demo` and `make test` each do all their own set-up on a fresh machine.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Build products live outside the clone so that fresh clones (and CI) reuse them.
EDEN_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/eden
export EDEN_CACHE_DIR
export CARGO_TARGET_DIR ?= $(EDEN_CACHE_DIR)/target
export CARGO_TERM_COLOR ?= never
# Incremental caches are per checkout: every fresh clone (CI) would add gigabytes to the shared
# target directory for no gain on a one-off build.
export CARGO_INCREMENTAL ?= 0

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help deps control-plane helm coredns crds check-crds lint test demo demo-node bench images

help:
	@echo "make demo   run Eden end to end on a local control plane and two redis-servers"
	@echo "make demo-node  the same on a real node, to watch real pods (root; installed with Helm)"
	@echo "make test   the whole suite: format, lint, CRDs up to date, unit and end-to-end tests"
	@echo "make bench  benchmarks; results go to BENCHMARKS.md"
	@echo "make crds   regenerate crds/ from the Rust types"
	@echo "make images OCI archives of eden-operator and eden-sidecar (no container engine needed)"

# From Debian's packages, when missing: redis-server and redis-tools (every Redis the tests and the
# demo run), umoci (the image test unpacks images with it), Node.js, npm, a JDK and Maven (the
# client matrix builds its node-redis, Jedis and Lettuce programs with them), and the test
# node's runtime (e2e/src/node.rs): containerd, runc, the CNI plugins, iptables, conntrack (the
# kube-proxy needs it) and a static busybox (the shell of the node's tools image).
deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v umoci >/dev/null || missing="$$missing umoci"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v javac >/dev/null || missing="$$missing openjdk-17-jdk-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	command -v containerd >/dev/null || missing="$$missing containerd"; \
	command -v runc >/dev/null || missing="$$missing runc"; \
	[ -x /usr/lib/cni/bridge ] || missing="$$missing containernetworking-plugins"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v conntrack >/dev/null || missing="$$missing conntrack"; \
	[ -x /bin/busybox ] || missing="$$missing busybox-static"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing from Debian packages"; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	  $(SUDO) systemctl disable --now redis-server containerd >/dev/null 2>&1 || true; \
	fi
	@command -v kubectl >/dev/null || { echo "kubectl is required on PATH"; exit 1; }

# etcd + kube-apiserver v1.33, built once per source version into $(EDEN_CACHE_DIR)/bin; the same
# binary is the test node's kubelet, kube-proxy, scheduler and controller-manager.
control-plane:
	@bash e2e/control-plane/build.sh >/dev/null

# CoreDNS, the test node's cluster DNS, built once per version from its published module.
coredns:
	@bash e2e/coredns/build.sh >/dev/null

# Helm, built once per version from its published module into $(EDEN_CACHE_DIR)/bin: the tests
# install the chart with it.
helm:
	@bash e2e/helm/build.sh >/dev/null

# The chart carries its own copy of the CRDs (Helm installs charts/eden/crds/ before templates).
crds:
	cargo run -q -p eden-operator --bin crdgen > crds/eden.yaml
	cp crds/eden.yaml charts/eden/crds/eden.yaml

check-crds:
	@cargo run -q -p eden-operator --bin crdgen | diff -u crds/eden.yaml - \
	  || { echo "crds/eden.yaml is stale: run 'make crds'"; exit 1; }
	@diff -u crds/eden.yaml charts/eden/crds/eden.yaml \
	  || { echo "charts/eden/crds/eden.yaml is stale: run 'make crds'"; exit 1; }

lint: helm
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	@"$$(bash e2e/helm/build.sh)" lint --strict --quiet charts/eden

test: deps control-plane helm coredns lint check-crds
	cargo test --workspace

demo: deps control-plane
	cargo build -q --bins -p eden-operator -p eden-sidecar -p eden-e2e
	"$(CARGO_TARGET_DIR)/debug/eden-demo"

# The walkthrough on a real node (e2e/src/node.rs; root), for watching real pods: this build's
# images installed with Helm, a migration under writing application pods; the node stays up
# until Enter when run from a terminal.
demo-node: deps control-plane helm coredns
	cargo build -q --bins -p eden-operator -p eden-sidecar -p eden-e2e
	"$(CARGO_TARGET_DIR)/debug/eden-demo-node"

# Five benchmarks in turn, each writing its own section of BENCHMARKS.md (helpers in bench/common.py):
#   bench/proxy.py        the sidecar against direct Redis, HAProxy and twemproxy (installs haproxy
#                         and nutcracker, Debian packages, when missing);
#   bench/routed.py       a routed session that sends everything to the source against the plain proxy;
#   bench/strategy.py     ConfigMap update -> applied on the local control plane, dual-write throughput;
#   bench/replication.py  sync and scan backfill of 1M keys against native REPLICAOF, peak RSS;
#   bench/cutover.py      cutover and rollback write pause with 10 and 100 sidecars, API cost at rest.
# Knobs (BENCH_ROUNDS, BENCH_REPLICATION_ROUNDS, BENCH_KEYS, ...) are in each script's header. A
# sidecar that does not build is still reported and then fails the target; so does a benchmark that fails.
bench: deps control-plane
	@built=0; cargo build -q --release -p eden-sidecar --bin eden-sidecar -p eden-operator --bin eden-operator || built=$$?; \
	flag=$$([ $$built = 0 ] || echo --sidecar-build-failed); \
	failed=""; \
	for script in proxy routed strategy replication cutover; do \
	  python3 bench/$$script.py $$flag "$(CARGO_TARGET_DIR)/release/eden-sidecar" || failed="$$failed $$script"; \
	done; \
	[ -z "$$failed" ] || echo "benchmarks that failed:$$failed"; \
	[ $$built = 0 ] && [ -z "$$failed" ]

# Release binaries packed as OCI archives (images/build.py) into $(CARGO_TARGET_DIR)/images,
# named as the chart's default values name them (fully qualified, tagged with its appVersion):
# `docker load`, `podman load`, `ctr images import` or `skopeo copy` them.
images:
	cargo build -q --release -p eden-operator -p eden-sidecar --bin eden-operator --bin eden-sidecar
	python3 images/build.py --out "$(CARGO_TARGET_DIR)/images" --chart charts/eden \
	  "$(CARGO_TARGET_DIR)/release/eden-operator" "$(CARGO_TARGET_DIR)/release/eden-sidecar"
