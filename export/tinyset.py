"""The committed tiny set: checkpoints (engines/tiny-checkpoints/<variant>), bundles (engines/tiny,
engines/tiny-2509, engines/tiny-2511), the 16-bit bundles of the Edit checkpoint (engines/tiny-fp16,
engines/tiny-bf16: the graph precisions real bundles use; no reference vectors of their own, they are
compared with engines/tiny's), the quantized twins (engines/tiny-fp8) and reference vectors
(engines/<bundle>/reference/).

`make_all` regenerates all of it deterministically; `check` regenerates into a temp dir and compares
with the committed files (exact for text and JSON, numerically within tolerance for graphs and
reference tensors, since float results may differ in the last bits between CPUs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import bundle, reference, tiny
from . import manifest as manifest_contract
from .reference import Case
from .variants import VARIANTS

BUNDLES = {"edit": "tiny", "edit-2509": "tiny-2509", "edit-2511": "tiny-2511"}
# Quantized twins of the bundles above: bundle -> (variant, export precision). Same checkpoint, the other
# graphs copied from the twin, the transformer quantized by `export bundle --precision` (export/fp8.py).
QUANTIZED = {"tiny-fp8": ("edit", "fp8")}
# 16-bit exports of the Edit checkpoint: what TensorRT runs in production precision (scripts/gpu-smoke.sh),
# and what the emulated device loop and the 16-bit parity tests run here.
SIXTEEN_BIT = {"tiny-fp16": torch.float16, "tiny-bf16": torch.bfloat16}
SEED = 0

CASES = {
    "tiny": [
        Case("edit_square", ["square.png"], ["make the sky blue"], [42], steps=4),
        Case(
            "edit_wide_cfg",
            ["wide.png"],
            ["add a red balloon"],
            [7],
            steps=4,
            negative_prompt="blurry, low quality",
            true_cfg_scale=4.0,
        ),
        Case(
            "edit_batch2",
            ["square.png", "square_b.png"],
            ["make it winter", "turn the car green and add snow on the roof, 雪, ❄"],
            [1, 2],
            steps=3,
        ),
        Case(
            "edit_lightning_jpeg",
            ["tall.jpg"],
            ["turn the photo into a watercolor painting"],
            [3],
            steps=8,
            lightning=True,
        ),
        Case("edit_size_override", ["square.png"], ["make it warmer"], [5], steps=2, width=96, height=144),
    ],
    "tiny-2509": [
        Case("plus2509_one_image", ["tall.jpg"], ["make it night"], [5], steps=4),
    ],
    "tiny-2511": [
        Case(
            "plus2511_two_images_cfg",
            ["square.png", "wide.png"],
            ["put the object from picture 2 into picture 1"],
            [11],
            steps=4,
            negative_prompt=" ",
            true_cfg_scale=4.0,
        ),
    ],
}


# Cases that also store the bulky float tensors (pixel_values, decoded float image).
FULL_CASES = {"edit_square", "plus2511_two_images_cfg"}


def log(msg: str) -> None:
    print(f"[tiny] {msg}", file=sys.stderr, flush=True)


def _weights_digest(ckpt: Path, component: str) -> str:
    h = hashlib.sha256()
    for f in sorted((ckpt / component).glob("*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def make_all(engines: Path, references: bool = True, report: str | None = None) -> dict:
    engines = Path(engines)
    torch.manual_seed(SEED)
    ck_root = engines / "tiny-checkpoints"
    rows = []
    exported: dict[str, dict] = {}  # component weight digest -> exported file
    for vname, bname in BUNDLES.items():
        variant = VARIANTS[vname]
        ckpt = ck_root / vname
        if ckpt.exists():
            shutil.rmtree(ckpt)
        log(f"checkpoint {ckpt}")
        tiny.make_checkpoint(ckpt, variant, SEED)
        out = engines / bname
        for old in out.glob("*.onnx*"):
            old.unlink()
        areas = bundle.Areas(tiny.TINY_VAE_AREA, tiny.TINY_CONDITION_AREA if variant.plus else None)
        pipe = bundle.load_pipeline(ckpt, variant, torch.float32)
        # Graphs whose weights and config equal an already exported bundle's are copied, not re-exported.
        reuse, todo = {}, []
        for comp, sub in (
            ("text_encoder", "text_encoder"),
            ("transformer", "transformer"),
            ("vae_encoder", "vae"),
            ("vae_decoder", "vae"),
        ):
            key = f"{comp}:{_weights_digest(ckpt, sub)}"
            (reuse.__setitem__(comp, exported[key]) if key in exported else todo.append((comp, key)))
        out.mkdir(parents=True, exist_ok=True)
        paths, vrows = bundle.export_components(pipe, variant, torch.float32, out, only=[c for c, _ in todo])
        for r in vrows:
            r["bundle"] = bname
        rows.extend(vrows)
        for comp, key in todo:
            exported[key] = paths[comp]
        for comp, src in reuse.items():
            dst = out / src.name
            shutil.copyfile(src, dst)
            paths[comp] = dst
            log(f"{bname}/{comp}: same weights as {src.parent.name}, copied")
        pipe.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
        manifest = bundle.build_manifest(
            pipe,
            variant,
            torch.float32,
            paths,
            areas,
            bname,
            {"checkpoint": f"engines/tiny-checkpoints/{vname}", "tiny": True, "seed": SEED},
            None,
        )
        manifest_contract.write(out / "manifest.json", manifest)
        if references:
            make_references(pipe, variant, out, areas)
    rows.extend(make_sixteen_bit(engines, ck_root))
    quantized = {}
    for bname, (vname, precision) in QUANTIZED.items():
        qrows, quantized[bname] = make_quantized(engines, bname, vname, precision, exported)
        rows.extend(qrows)
    result = {"verification": rows, "quantized": quantized}
    if report:
        Path(report).write_text(json.dumps(result, indent=2) + "\n")
    return result


def make_quantized(engines: Path, bname: str, vname: str, precision: str, exported: dict) -> tuple[list, dict]:
    """A quantized twin of the `vname` bundle: its graphs copied, the transformer quantized (calibrated on
    the pipeline of the same tiny checkpoint); no reference vectors (diffusers has no FP8 pipeline).
    Returns (verification rows, the quantization report)."""
    variant = VARIANTS[vname]
    ckpt = engines / "tiny-checkpoints" / vname
    out = engines / bname
    for old in out.glob("*.onnx*"):
        old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    log(f"{bname}: {precision} twin of the {vname} bundle")
    pipe = bundle.load_pipeline(ckpt, variant, torch.float32)
    areas = bundle.Areas(tiny.TINY_VAE_AREA, tiny.TINY_CONDITION_AREA if variant.plus else None)
    paths = {}
    for comp, sub in (
        ("text_encoder", "text_encoder"),
        ("transformer", "transformer"),
        ("vae_encoder", "vae"),
        ("vae_decoder", "vae"),
    ):
        src = exported[f"{comp}:{_weights_digest(ckpt, sub)}"]
        paths[comp] = out / src.name
        shutil.copyfile(src, paths[comp])
    quantization, qreport, rows = bundle.quantize(pipe, variant, torch.float32, paths, areas, precision, None)
    for r in rows:
        r["bundle"] = bname
    pipe.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    source = {"checkpoint": f"engines/tiny-checkpoints/{vname}", "tiny": True, "seed": SEED}
    manifest = bundle.build_manifest(pipe, variant, torch.float32, paths, areas, bname, source, None, quantization)
    manifest_contract.write(out / "manifest.json", manifest)
    return rows, qreport


def make_sixteen_bit(engines: Path, ck_root: Path) -> list:
    """engines/tiny-fp16 and engines/tiny-bf16: the Edit checkpoint exported with float16 / bfloat16 graphs
    (weights and activations), at the tiny working areas."""
    rows = []
    variant = VARIANTS["edit"]
    ckpt = ck_root / "edit"
    areas = bundle.Areas(tiny.TINY_VAE_AREA, None)
    for bname, dtype in SIXTEEN_BIT.items():
        out = engines / bname
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        log(f"{bname}: {bundle.DTYPE_NAMES[dtype]} graphs of {ckpt}")
        pipe = bundle.load_pipeline(ckpt, variant, dtype)
        paths, vrows = bundle.export_components(pipe, variant, dtype, out)
        for r in vrows:
            r["bundle"] = bname
        rows.extend(vrows)
        pipe.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
        source = {"checkpoint": "engines/tiny-checkpoints/edit", "tiny": True, "seed": SEED}
        manifest = bundle.build_manifest(pipe, variant, dtype, paths, areas, bname, source, None)
        manifest_contract.write(out / "manifest.json", manifest)
    return rows


def make_references(pipe, variant, bundle_dir: Path, areas) -> None:
    ref_dir = bundle_dir / "reference"
    images_dir = ref_dir / "images"
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    cases = CASES[bundle_dir.name]
    for f in sorted({f for c in cases for f in c.images}):
        size, seed, fmt = reference.REFERENCE_IMAGES[f]
        reference.make_image(images_dir / f, size, seed, fmt)
    for case in cases:
        log(f"reference {bundle_dir.name}/{case.name}")
        torch.manual_seed(SEED)
        full = case.name in FULL_CASES
        tensors, meta = reference.run_case(pipe, variant, case, images_dir, areas, full=full)
        reference.write_case(ref_dir, case.name, tensors, meta)


# ----------------------------------------------------------------------------------------------
# check: regenerate and compare
# ----------------------------------------------------------------------------------------------

GRAPH_RTOL = 1e-5
TENSOR_RTOL = 1e-4


def _compare_weights(a: Path, b: Path) -> list[str]:
    """Graphs onnxruntime's CPU provider cannot run (bfloat16): the same nodes, and the same weights."""
    import onnx
    from onnx import numpy_helper

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    if [n.op_type for n in ma.graph.node] != [n.op_type for n in mb.graph.node]:
        return [f"{a.name}: nodes differ"]
    wa = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in ma.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in mb.graph.initializer}
    if set(wa) != set(wb):
        return [f"{a.name}: weight names differ"]
    x = np.concatenate([wa[k].ravel() for k in sorted(wa)] or [np.zeros(1)])
    y = np.concatenate([wb[k].ravel() for k in sorted(wb)] or [np.zeros(1)])
    err = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
    return [f"{a.name}: weights differ (rel L2 {err:.3g})"] if err > GRAPH_RTOL else []


FEED_DTYPES = {"float32": np.float32, "float16": np.float16}


def _compare_graphs(a: Path, b: Path) -> list[str]:
    from . import onnx_export as ox

    errors = []
    if ox.io_contract(a) != ox.io_contract(b):
        return [f"{a.name}: IO contract differs"]
    # Same outputs on the same random inputs.
    ins, _ = ox.io_contract(a)
    if any(i["dtype"] == "bfloat16" for i in ins):
        return _compare_weights(a, b)
    rng = np.random.default_rng(0)
    feeds = {}
    sizes = {
        "batch": 2,
        "seq": 9,
        "txt_seq": 9,
        "img_seq": 32,
        "units": 16,
        "patches": 64,
        "height": 32,
        "width": 48,
        "lh": 4,
        "lw": 6,
    }
    if "pixel_values" in [i["name"] for i in ins]:
        return []  # the text encoder needs consistent index inputs: covered by the reference tensors
    for i in ins:
        shape = [sizes.get(d, 1) if isinstance(d, str) else d for d in i["shape"]]
        if i["dtype"] == "int64":
            feeds[i["name"]] = np.ones(shape, dtype=np.int64)
        else:
            feeds[i["name"]] = rng.standard_normal(shape).astype(FEED_DTYPES[i["dtype"]])
    oa, ob = (o.astype(np.float32) for o in (ox.run_ort(a, feeds)[0], ox.run_ort(b, feeds)[0]))
    err = ox.rel_l2(oa, ob)
    if err > GRAPH_RTOL:
        errors.append(f"{a.name}: outputs differ (rel L2 {err:.3g})")
    return errors


def _compare_tensors(a: Path, b: Path) -> list[str]:
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        return [f"{a.name}: tensor names differ: {sorted(set(ta) ^ set(tb))}"]
    errors = []
    for k in ta:
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            errors.append(f"{a.name}:{k}: shape/dtype {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}")
        elif x.dtype.kind in "iub":
            diff = np.abs(x.astype(np.int64) - y.astype(np.int64)).max() if x.size else 0
            # final 8-bit images may flip by one level where a value sits on a rounding boundary
            if diff > (1 if k == "image" else 0):
                errors.append(f"{a.name}:{k}: integer values differ (max {diff})")
        else:
            from .onnx_export import rel_l2

            err = rel_l2(x, y)
            if err > TENSOR_RTOL:
                errors.append(f"{a.name}:{k}: rel L2 {err:.3g} > {TENSOR_RTOL}")
    return errors


def check(engines: Path) -> bool:
    engines = Path(engines)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        make_all(fresh)
        errors = []
        for rel in sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()):
            a, b = engines / rel, fresh / rel
            if not a.exists():
                errors.append(f"{rel}: regenerated but not committed")
                continue
            if rel.suffix == ".onnx":
                errors += _compare_graphs(a, b)
            elif rel.suffix == ".safetensors" and "reference" in rel.parts or rel.suffix == ".safetensors":
                errors += _compare_tensors(a, b)
            elif rel.suffix == ".json" and "reference" in rel.parts:
                ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
                if ja != jb:
                    errors.append(f"{rel}: differs")
            elif rel.name == "manifest.json":
                ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
                for j in (ja, jb):
                    for c in j["components"].values():
                        c.pop("sha256", None)  # graph bytes may differ; graphs are compared numerically
                if ja != jb:
                    errors.append(f"{rel}: differs")
            elif rel.suffix in (".png", ".jpg"):
                from PIL import Image

                if not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))):
                    errors.append(f"{rel}: pixels differ")
            elif a.read_bytes() != b.read_bytes():
                errors.append(f"{rel}: differs")
        committed = {
            p.relative_to(engines)
            for d in [*BUNDLES.values(), *SIXTEEN_BIT, *QUANTIZED, "tiny-checkpoints"]
            for p in (engines / d).rglob("*")
            if p.is_file() and p.name != "README.md"
        }
        regenerated = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
        for extra in sorted(committed - regenerated):
            errors.append(f"{extra}: committed but no longer generated")
    for e in errors:
        print(f"check: {e}", file=sys.stderr)
    print(f"check: {'OK' if not errors else f'{len(errors)} difference(s)'}", file=sys.stderr)
    return not errors
