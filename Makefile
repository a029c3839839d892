# The two set-up commands of README.md (serve, test), the inner-loop check and the bench run; each
# installs what it needs first.
#   make serve  - serve the embedded tiny model on $(API_HOST):$(API_PORT) (CPU, ONNX Runtime)
#   make test   - everything CI runs: lint (rustfmt, clippy, ruff), Rust unit + integration tests,
#                 export tests, tiny-set regeneration check
#   make check  - the inner loop: lint and the Rust unit tests only (a few minutes)
#   make bench  - every bench; rewrites the README's performance tables (scripts/bench.sh)
#   make memory-check - issue 21's check: a 1 MP bundle, eight concurrent requests under BATCH_SIZE=4,
#                 peak RSS under MEMORY_LIMIT (5-10 minutes; not part of make test)
#   make scale-check - the real-width run of docs/real-scale.md (not in CI: ~12 GB of disk, ~21 GB of RAM, ~1 h)
SHELL := /bin/bash
.ONESHELL:
.PHONY: serve test check lint bench memory-check setup setup-runtime setup-check scale-check

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

memory-check: setup
	set -euo pipefail
	source .deps/env
	cargo test --release --test memory_check -- --ignored --nocapture

# docs/real-scale.md: a random checkpoint at the real widths (export scale-model), exported with the users' command
# as bf16 (GPU) and fp32 (CPU) bundles, `build --dry-run` on the bf16 one, then qwen-edit edit on the fp32 one
# against diffusers (export scale-check). SCALE_OUT (default scale-out, git-ignored), SCALE_VARIANT (edit-2511),
# SCALE_SIDE (1024; 512 needs 14 GB of RAM instead of 21). Each bundle is deleted once measured; the checkpoint
# and the fp32 bundle stay for reruns.
SCALE_OUT ?= scale-out
SCALE_VARIANT ?= edit-2511
SCALE_SIDE ?= 1024
scale-check: setup
	set -euo pipefail
	source .deps/env
	cargo build --release --bin qwen-edit
	py=.venv/bin/python
	[ -d $(SCALE_OUT)/ckpt ] || $$py -m export scale-model --variant $(SCALE_VARIANT) --out $(SCALE_OUT)/ckpt
	$$py -m export bundle --checkpoint $(SCALE_OUT)/ckpt --out $(SCALE_OUT)/bundle-bf16 --dtype bfloat16 \
		--report $(SCALE_OUT)/bf16-report.json
	du -ab $(SCALE_OUT)/bundle-bf16 > $(SCALE_OUT)/bf16-files.txt
	target/release/qwen-edit build --dry-run --bundle $(SCALE_OUT)/bundle-bf16 --report $(SCALE_OUT)/dry-run.json
	rm -rf $(SCALE_OUT)/bundle-bf16
	$$py -m export bundle --checkpoint $(SCALE_OUT)/ckpt --out $(SCALE_OUT)/bundle-fp32 --dtype float32 \
		--report $(SCALE_OUT)/fp32-report.json
	$$py -m export scale-check --checkpoint $(SCALE_OUT)/ckpt --bundle $(SCALE_OUT)/bundle-fp32 \
		--out $(SCALE_OUT)/run --qwen-edit target/release/qwen-edit --side $(SCALE_SIDE)
