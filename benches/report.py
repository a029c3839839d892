"""Turns the results of the benches into the README's performance tables (no hand-typed numbers).

Reads criterion's estimates under target/criterion and the tables the bench scripts leave in
target/bench-tables, prints every table, and with `--readme FILE` (repeatable: README.md, docs/fp8.md)
replaces each block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` with its table, dated, with
the machine it ran on (projections: dated, marked as computed). A table whose results are missing is
left as it was. Run by scripts/bench.sh; standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRITERION = ROOT / "target/criterion"
TABLES = ROOT / "target/bench-tables"

OVERHEAD_ROWS = [
    ("parse_request_json", "parse the request JSON"),
    ("base64_decode", "base64-decode the image"),
    ("jpeg_decode", "decode the JPEG (libjpeg-turbo both)"),
    (
        "vl_preprocess_resize_normalize_patchify",
        "VL processor: smart_resize (bicubic 1024 -> 1036, torchvision backend), rescale, normalize, patchify",
    ),
    ("vae_normalize_f16", "VAE input: 1024x1024 to CHW half floats in [-1, 1]"),
    ("png_encode", "PNG-encode the 1024x1024 result"),
    ("base64_encode", "base64-encode the PNG"),
    ("response_json", "response JSON"),
    ("total_without_model", "**total per request, model excluded**"),
    ("resize_lanczos_to_384_edit_plus", "(Edit Plus only: Lanczos 1024 -> 384x384 VL copy)"),
]
IO_ROWS = [
    ("preprocess_jpeg", "JPEG upload: decode + VL processor + VAE input"),
    ("preprocess_png", "PNG upload: decode + VL processor + VAE input"),
    ("encode_png_base64", "response: PNG encode + base64"),
    ("encode_jpeg_base64", "response: JPEG (q90) encode + base64"),
]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return f"{model}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.machine()}"


def median_ms(group: str, bench: str) -> float | None:
    path = CRITERION / group / bench / "new/estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["median"]["point_estimate"] / 1e6


def stamp(path: Path | None = None) -> str:
    day = datetime.date.fromtimestamp(path.stat().st_mtime) if path else datetime.date.today()
    return f"Measured {day.isoformat()} on {machine()}."


def pipeline_table() -> str | None:
    rows = [(n, median_ms("batch", f"size_{n}")) for n in (1, 2, 4, 8)]
    rows = [(n, ms) for n, ms in rows if ms is not None]
    if not rows or rows[0][0] != 1:
        return None
    base = 1000.0 / rows[0][1]
    out = [
        stamp(CRITERION / "batch/size_1/new/estimates.json"),
        "`cargo bench --bench pipeline -- batch` (criterion median; tiny bundle, ONNX Runtime CPU, one "
        "`run_batch` of n different 256x256 requests with 4 steps, no CFG, preprocessing included).",
        "",
        "| batch size | ms per batch | ms per image | images/s | vs batch 1 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, ms in rows:
        ips = n * 1000.0 / ms
        out.append(f"| {n} | {ms:.1f} | {ms / n:.1f} | {ips:.2f} | {ips / base:.2f}x |")
    return "\n".join(out)


def overhead_table() -> str | None:
    rust = {k: median_ms("server_overhead_1024_jpeg", k) for k, _ in OVERHEAD_ROWS}
    if any(v is None for v in rust.values()):
        return None
    base_path = TABLES / "server_overhead_baseline.json"
    py = json.loads(base_path.read_text()) if base_path.exists() else {}
    out = [
        stamp(CRITERION / "server_overhead_1024_jpeg/total_without_model/new/estimates.json"),
        "Rust: `cargo bench --bench server_overhead` (criterion median). Python: "
        "`.venv/bin/python benches/server_overhead_baseline.py`. Milliseconds.",
        "",
        "| stage | Rust | Python |",
        "| --- | ---: | ---: |",
    ]
    for key, label in OVERHEAD_ROWS:
        p = f"{py[key]:.1f}" if key in py else "n/a"
        r = f"{rust[key]:.2f}" if rust[key] < 1 else f"{rust[key]:.1f}"
        if label.startswith("**"):
            r, p = f"**{r}**", f"**{p}**"
        out.append(f"| {label} | {r} | {p} |")
    return "\n".join(out)


def io_table() -> str | None:
    rows = [(label, median_ms("io_1024", key)) for key, label in IO_ROWS]
    if any(ms is None for _, ms in rows):
        return None
    out = [
        stamp(CRITERION / "io_1024/preprocess_jpeg/new/estimates.json"),
        "`cargo bench --bench server_overhead -- io_1024` (criterion median, 1024x1024 picture). Milliseconds.",
        "",
        "| step | ms |",
        "| --- | ---: |",
    ]
    out += [f"| {label} | {ms:.1f} |" for label, ms in rows]
    return "\n".join(out)


def file_table(name: str, command: str) -> str | None:
    path = TABLES / name
    if not path.exists():
        return None
    return f"{stamp(path)} `{command}`.\n\n{path.read_text().strip()}"


def projection_table(name: str, command: str) -> str | None:
    path = TABLES / name
    if not path.exists():
        return None
    day = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    return f"Computed {day} by `{command}`.\n\n{path.read_text().strip()}"


def tables() -> dict[str, str | None]:
    return {
        "fp8-quality": file_table("fp8_quality.md", "source .deps/env && .venv/bin/python benches/fp8_quality.py"),
        "fp8-tolerance": file_table("fp8_tolerance.md", "source .deps/env && .venv/bin/python benches/fp8_quality.py"),
        "fp8-projection": projection_table("fp8_projection.md", "python3 scripts/capacity.py"),
        "edit-vs-diffusers": file_table(
            "edit_vs_diffusers.md", "source .deps/env && .venv/bin/python benches/edit_vs_diffusers.py"
        ),
        "real-size": file_table(
            "real_size.md", "source .deps/env && .venv/bin/python benches/real_size_vs_diffusers.py"
        ),
        "attention-memory": file_table(
            "attention_memory.md", "source .deps/env && .venv/bin/python benches/real_size_vs_diffusers.py"
        ),
        "batch": pipeline_table(),
        "stages": file_table("stages.md", "cargo bench --bench pipeline"),
        "load": file_table("load.md", "cargo bench --bench load"),
        "server-overhead": overhead_table(),
        "io": io_table(),
    }


def update(readme: Path, found: dict[str, str | None]) -> list[str]:
    text = readme.read_text()
    done = []
    for name, table in found.items():
        if table is None:
            continue
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            continue
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
        done.append(name)
    readme.write_text(text)
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, action="append", default=[], help="replace the bench blocks of this file")
    args = ap.parse_args()
    found = tables()
    for name, table in found.items():
        print(f"## {name}\n\n{table or '(no results: run its bench first)'}\n")
    for path in args.readme:
        done = update(path, found)
        print(f"updated {path}: {', '.join(done) or 'nothing'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
