# The two set-up commands of README.md (serve, test), the inner-loop check and the bench run; each
# installs what it needs first.
#   make serve  - serve the embedded tiny model on $(API_HOST):$(API_PORT) (CPU, ONNX Runtime)
#   make test   - everything CI runs: lint (rustfmt, clippy, ruff), Rust unit + integration tests,
#                 export tests, tiny-set regeneration check
#   make check  - the inner loop: lint and the Rust unit tests only (a few minutes)
#   make bench  - every bench; rewrites the README's performance tables (scripts/bench.sh)
SHELL := /bin/bash
.ONESHELL:
.PHONY: serve test check lint bench setup setup-runtime setup-check

setup-runtime:
	scripts/setup.sh runtime

setup-check:
	scripts/setup.sh check

setup:
	scripts/setup.sh all

serve: setup-runtime
	source .deps/env
	cargo run --release --bin qwen-edit -- serve

# rustfmt (rustfmt.toml), clippy with warnings as errors, ruff lint + format check (pyproject.toml).
lint:
	set -euo pipefail
	source .deps/env
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check .

check: setup-check
	set -euo pipefail
	$(MAKE) --no-print-directory lint
	source .deps/env
	cargo test --lib

test: setup
	set -euo pipefail
	$(MAKE) --no-print-directory lint
	source .deps/env
	# No incremental cache: a one-shot build does not reuse it and it costs ~5 GB of disk.
	CARGO_INCREMENTAL=0 QWEN_EDIT_REQUIRE_TRT_SHIM=1 cargo test --all-targets
	.venv/bin/python -m pytest
	.venv/bin/python -m export check

bench:
	scripts/bench.sh
