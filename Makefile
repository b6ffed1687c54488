# Chaperone — the project's commands. `make test` and `make demo` set everything
# up on a fresh machine (the first run builds the Kubernetes tools: 10-20 min).
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all tools crds check-crds check-ring fmt-check lint test demo hot-text clean

all: test

## tools: build etcd, kube-apiserver, helm and fetch kubectl into ~/.cache/chaperone/tools
tools:
	@bash scripts/tools.sh all

## crds: regenerate crds/ and the chart's CRD templates from the Rust types (crates/api)
crds:
	rm -rf charts/chaperone/templates/crds
	$(CARGO) run -q -p chaperone-cli -- crds --out-dir crds --helm-out-dir charts/chaperone/templates/crds

## check-crds: fail when crds/ or the chart's CRD templates differ from what the Rust types generate
check-crds:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(CARGO) run -q -p chaperone-cli -- crds --out-dir "$$tmp/crds" --helm-out-dir "$$tmp/helm" && \
	if ! diff -ru crds "$$tmp/crds"; then echo "error: crds/ is stale: run 'make crds' and commit the result" >&2; exit 1; fi && \
	if ! diff -ru charts/chaperone/templates/crds "$$tmp/helm"; then echo "error: charts/chaperone/templates/crds is stale: run 'make crds'" >&2; exit 1; fi && \
	echo "crds/ and the chart's CRDs are up to date"

## check-ring: aws-lc-rs is the only crypto backend; nothing may pull in ring
check-ring:
	@out=$$($(CARGO) tree --workspace -e normal,build,dev -i ring 2>/dev/null); \
	if [ -n "$$out" ]; then echo "$$out"; echo "error: ring is in the dependency graph (see above)" >&2; exit 1; fi; \
	echo "no ring in the dependency graph"

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: format, lint, generated-file freshness, then unit and real-API-server tests
test: fmt-check lint check-crds check-ring tools
	$(CARGO) test --workspace

## demo: start a local control plane, install the CRDs, apply the examples, show them
demo: tools
	@bash scripts/demo.sh

## hot-text: re-profile the release sidecar and regenerate its code layout, crates/sidecar/hot-text.ld (needs valgrind; ≈ 10 min)
hot-text:
	@bash bench/hot-text.sh

clean:
	$(CARGO) clean
	rm -rf .tmp
