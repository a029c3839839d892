#!/usr/bin/env bash
# Runs every bench and rewrites the README's performance tables from their results (about 20 minutes
# on 2 cores; the first real-size comparison also exports a 1 MP bundle into target/, 3 more).
# Usage: scripts/bench.sh   (or `make bench`). Needs `scripts/setup.sh all` (it runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
source .deps/env
cargo bench --bench pipeline -- batch --noplot
cargo bench --bench server_overhead -- --noplot
.venv/bin/python benches/server_overhead_baseline.py
.venv/bin/python benches/edit_vs_diffusers.py
.venv/bin/python benches/real_size_vs_diffusers.py
cargo bench --bench load
.venv/bin/python benches/fp8_quality.py
python3 scripts/capacity.py --out target/bench-tables/fp8_projection.md
python3 benches/report.py --readme README.md --readme docs/fp8.md
