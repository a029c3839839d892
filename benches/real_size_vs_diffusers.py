"""One edit at real resolutions, stage by stage, with peak memory: diffusers' QwenImageEditPlusPipeline
(torch, CPU) against `qwen-edit` (ONNX Runtime, CPU) on the same weights, the committed
`engines/tiny-checkpoints/edit-2509` exported with `python -m export bundle` at the real 1 MP area.

For each size (1024x1024, then 512x512): a size x size picture edited to a size x size output, 2 steps,
no true CFG, 2 threads on each side, one warm-up edit then the median of RUNS edits, each side in a
fresh process (so the peaks are the edit's own). Memory: the process's peak resident set (VmHWM), and
the largest growth of resident memory during one transformer call (the kernel's high-water mark is
reset before each call): the attention's share. Writes target/bench-tables/real_size.md for
benches/report.py.

Then the attention's memory by token count: the transformer alone, one call in a fresh process at 2,048,
4,096 and 8,192 image tokens (target plus condition: two 512x512, two ~724x724, two 1024x1024 pictures; this
bundle's 1024x1024 edit is the last, its 512x512 edit has 5,120, the condition staying at the 1 MP area), with
the attentions fused and the other rewrites of runtime::fuse (what qwen-edit runs) and the graph as exported
(MatMul, Softmax, MatMul: the scores materialised); the growth of resident memory during the call. Writes
target/bench-tables/attention_memory.md.

    source .deps/env && .venv/bin/python benches/real_size_vs_diffusers.py [--sizes 1024,512] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benches"))
from report import machine  # noqa: E402 (after the sys.path lines that make it importable)

CHECKPOINT = ROOT / "engines/tiny-checkpoints/edit-2509"
BUNDLE = ROOT / "target/bench-bundles/edit-2509-1mp"
THREADS = 2
STEPS = 2
PROMPT = "make the sky blue"
STAGES = [
    ("text_encoder_s", "text encoder"),
    ("vae_encode_s", "VAE encode"),
    ("transformer_s", f"transformer, {STEPS} steps"),
    ("vae_decode_s", "VAE decode"),
    ("edit_s", "whole edit"),
]


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _export_stamp() -> str:
    """What the exported bundle depends on: the export tool's code and the checkpoint's files."""
    h = hashlib.sha256()
    for base in (ROOT / "export", CHECKPOINT):
        for f in sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(f.relative_to(base)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def ensure_bundle() -> Path:
    """Exports the checkpoint at the real areas (`python -m export bundle`), unless already done."""
    stamp = BUNDLE / ".export-stamp"
    want = _export_stamp()
    if stamp.exists() and stamp.read_text() == want:
        return BUNDLE
    print(f"exporting {CHECKPOINT.relative_to(ROOT)} to {BUNDLE.relative_to(ROOT)} (1 MP area)", file=sys.stderr)
    cmd = [sys.executable, "-m", "export", "bundle", "--checkpoint", str(CHECKPOINT), "--out", str(BUNDLE)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    stamp.write_text(want)
    return BUNDLE


def picture(size: int):
    from PIL import Image

    src = Image.open(ROOT / "engines/tiny/reference/images/square.png").convert("RGB")
    return src.resize((size, size), Image.LANCZOS)


def child_diffusers(size: int, runs: int) -> dict:
    """The diffusers side, in this (fresh) process."""
    import torch

    torch.set_num_threads(THREADS)
    from export.__main__ import _quiet

    _quiet()
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(str(CHECKPOINT), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    times: dict[str, float] = {}
    state = {"peak": 0, "growth": 0}

    def timed(key, fn, transformer=False):
        def wrapper(*a, **kw):
            if transformer:
                state["peak"] = max(state["peak"], _status_bytes("VmHWM:"))
                Path("/proc/self/clear_refs").write_text("5")
                before = _status_bytes("VmRSS:")
            t = time.perf_counter()
            out = fn(*a, **kw)
            times[key] = times.get(key, 0.0) + time.perf_counter() - t
            if transformer:
                state["growth"] = max(state["growth"], _status_bytes("VmHWM:") - before)
            return out

        return wrapper

    pipe.text_encoder.forward = timed("text_encoder_s", pipe.text_encoder.forward)
    pipe.vae.encode = timed("vae_encode_s", pipe.vae.encode)
    pipe.transformer.forward = timed("transformer_s", pipe.transformer.forward, transformer=True)
    pipe.vae.decode = timed("vae_decode_s", pipe.vae.decode)
    image = picture(size)
    samples = []
    with torch.no_grad():
        for i in range(runs + 1):
            times.clear()
            t = time.perf_counter()
            out = pipe(
                image=[image],
                prompt=PROMPT,
                num_inference_steps=STEPS,
                true_cfg_scale=1.0,
                width=size,
                height=size,
                generator=torch.Generator().manual_seed(i),
                output_type="pil",
            ).images[0]
            times["edit_s"] = time.perf_counter() - t
            assert out.size == (size, size), out.size
            if i > 0:
                samples.append(dict(times))
    cpu = os.times()
    return {
        "size": size,
        **{k: statistics.median(s[k] for s in samples) for k, _ in STAGES},
        "peak_rss_bytes": max(state["peak"], _status_bytes("VmHWM:")),
        "transformer_growth_bytes": state["growth"],
        "user_s": cpu.user,
        "sys_s": cpu.system,
        "version": __import__("diffusers").__version__,
        "torch": torch.__version__,
    }


def run_diffusers(size: int, runs: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-diffusers", str(size), "--runs", str(runs)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_qwen_edit(bundle: Path, size: int, runs: int) -> dict:
    target = ROOT / "target/bench-tables" / f"real_size_qwen_{size}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["cargo", "bench", "--bench", "real_size", "--", "--bundle", str(bundle), "--size", str(size)]
    cmd += ["--runs", str(runs), "--threads", str(THREADS), "--json", str(target)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(target.read_text())


ATTENTION_TOKENS = (2048, 4096, 8192)


def run_transformer_call(bundle: Path, tokens: int, plain: bool) -> dict:
    target = ROOT / "target/bench-tables" / f"attention_{tokens}_{'plain' if plain else 'fused'}.json"
    cmd = ["cargo", "bench", "--bench", "real_size", "--", "--bundle", str(bundle), "--transformer-tokens", str(tokens)]
    cmd += ["--threads", str(THREADS), "--json", str(target)]
    env = {**os.environ, "QWEN_EDIT_PLAIN_GRAPH": "1" if plain else "0"}
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads(target.read_text())


def attention_table(bundle: Path) -> str:
    rows = {t: tuple(run_transformer_call(bundle, t, plain) for plain in (False, True)) for t in ATTENTION_TOKENS}
    out = [
        "The transformer of the same bundle alone, one call in a fresh process (64 text tokens, batch 1, "
        f"{THREADS} threads): the growth of resident memory during the call.",
        "",
        "| image tokens | target + condition | fused attention (qwen-edit) | exported chain: MatMul, Softmax, MatMul |",
        "| ---: | --- | ---: | ---: |",
    ]
    sizes = {2048: "2 x 512x512", 4096: "2 x ~724x724", 8192: "2 x 1024x1024 (the 1024x1024 edit)"}
    for t, (fused, plain) in rows.items():
        out.append(
            f"| {t:,} | {sizes[t]} | {gib(fused['growth_bytes'])} ({fused['seconds']:.2f} s) | "
            f"{gib(plain['growth_bytes'])} ({plain['seconds']:.2f} s) |"
        )
    lo, hi = ATTENTION_TOKENS[0], ATTENTION_TOKENS[-1]
    ratio = [rows[hi][k]["growth_bytes"] / max(rows[lo][k]["growth_bytes"], 1) for k in (0, 1)]
    out += [
        "",
        f"From {lo:,} to {hi:,} tokens ({hi // lo}x): fused {ratio[0]:.1f}x, exported chain {ratio[1]:.1f}x "
        f"(linear would be {hi // lo}x, the square {(hi // lo) ** 2}x).",
    ]
    return "\n".join(out) + "\n"


def gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def table(rows: list[tuple[dict, dict]], runs: int) -> str:
    import onnxruntime

    d0 = rows[0][0]
    out = [
        f"`engines/tiny-checkpoints/edit-2509` exported at the real 1 MP area; one size x size edit, {STEPS} steps, "
        f"no true CFG, {THREADS} threads each; seconds are the median of {runs} edits after a warm-up, each "
        "side in its own process. diffusers "
        f"{d0['version']} (torch {d0['torch']}, SDPA) against qwen-edit (ONNX Runtime {onnxruntime.__version__}).",
        "",
        "| size | stage | diffusers | qwen-edit | qwen-edit / diffusers |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for d, q in rows:
        size = f"{d['size']}x{d['size']}"
        for key, label in STAGES:
            bold = "**" if key == "edit_s" else ""
            out.append(f"| {size} | {bold}{label}{bold} | {d[key]:.2f} s | {q[key]:.2f} s | {q[key] / d[key]:.2f} |")
        out.append(
            f"| {size} | peak resident memory | {gib(d['peak_rss_bytes'])} | {gib(q['peak_rss_bytes'])} | "
            f"{q['peak_rss_bytes'] / d['peak_rss_bytes']:.2f} |"
        )
        out.append(
            f"| {size} | memory growth in one transformer call | {gib(d['transformer_growth_bytes'])} | "
            f"{gib(q['transformer_growth_bytes'])} | |"
        )
        out.append(
            f"| {size} | CPU seconds of the process, user + system | {d['user_s']:.1f} + {d['sys_s']:.1f} | "
            f"{q['user_s']:.1f} + {q['sys_s']:.1f} | |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,512")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child-diffusers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_diffusers:
        print(json.dumps(child_diffusers(args.child_diffusers, args.runs)))
        return 0
    bundle = ensure_bundle()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"{size}x{size}: diffusers", file=sys.stderr)
        d = run_diffusers(size, args.runs)
        print(f"{size}x{size}: qwen-edit", file=sys.stderr)
        q = run_qwen_edit(bundle, size, args.runs)
        print(json.dumps({"diffusers": d, "qwen_edit": q}), file=sys.stderr)
        rows.append((d, q))
    text = table(rows, args.runs)
    print(f"{machine()}\n\n{text}")
    out = ROOT / "target/bench-tables"
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_size.md").write_text(text)
    print("attention memory by token count", file=sys.stderr)
    attention = attention_table(bundle)
    print(attention)
    (out / "attention_memory.md").write_text(attention)
    return 0


if __name__ == "__main__":
    sys.exit(main())
