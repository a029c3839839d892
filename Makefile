# The two set-up commands of README.md (serve, test) and the bench run; each installs what it needs first.
#   make serve  - serve the embedded tiny model on $(API_HOST):$(API_PORT) (CPU, ONNX Runtime)
#   make test   - every test: Rust unit + integration tests, export tests, tiny-set regeneration check
#   make bench  - every bench; rewrites the README's performance tables (scripts/bench.sh)
SHELL := /bin/bash
.ONESHELL:
.PHONY: serve test bench setup setup-runtime

setup-runtime:
	scripts/setup.sh runtime

setup:
	scripts/setup.sh all

serve: setup-runtime
	source .deps/env
	cargo run --release --bin qwen-edit -- serve

test: setup
	set -euo pipefail
	source .deps/env
	QWEN_EDIT_REQUIRE_TRT_SHIM=1 cargo test --all-targets
	.venv/bin/python -m pytest
	.venv/bin/python -m export check

bench:
	scripts/bench.sh
