"""Command line of the export tool: `python -m export {bundle,tiny,reference,check} ...`.

Exit codes: 0 success, 1 verification/check failure, 2 bad use (missing checkpoint, unknown variant,
LoRA that does not fit, ...), each reported as one clear line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from .variants import VARIANTS, UsageError, get_variant


def _areas(args, variant):
    from .bundle import REAL_CONDITION_AREA, REAL_VAE_AREA, Areas

    vae = args.vae_area or REAL_VAE_AREA
    cond = (args.condition_area or REAL_CONDITION_AREA) if variant.plus else None
    return Areas(vae, cond)


def cmd_bundle(args) -> int:
    from . import bundle
    from .variants import detect_variant

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise UsageError(f"checkpoint directory not found: {ckpt}")
    variant = get_variant(args.variant) if args.variant else detect_variant(ckpt)
    report = bundle.export_bundle(
        ckpt,
        Path(args.out),
        variant=variant,
        dtype=args.dtype,
        lightning_lora=Path(args.lightning_lora) if args.lightning_lora else None,
        lora_scale=args.lora_scale,
        areas=_areas(args, variant),
        name=args.name,
        precision=args.precision,
        fp8_settings=_fp8_settings(args),
    )
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _fp8_settings(args):
    if args.precision != "fp8":
        if args.fp8_keep:
            raise UsageError("--fp8-keep needs --precision fp8")
        return None
    from .fp8 import CalibrationSettings

    if args.calibration_runs < 1 or args.calibration_steps < 1:
        raise UsageError("--calibration-runs and --calibration-steps must be at least 1")
    return CalibrationSettings(cases=args.calibration_runs, steps=args.calibration_steps, keep=tuple(args.fp8_keep))


def cmd_tiny(args) -> int:
    from . import tinyset

    tinyset.make_all(Path(args.engines), references=not args.no_references, report=args.report)
    return 0


def cmd_scale_model(args) -> int:
    from . import scale

    scale.make_checkpoint(
        Path(args.out),
        get_variant(args.variant),
        layers=args.layers,
        text_layers=args.text_layers,
        vision_layers=args.vision_layers,
        seed=args.seed,
    )
    return 0


def cmd_scale_check(args) -> int:
    from . import scale_check

    for p in (args.checkpoint, args.bundle):
        if not Path(p).is_dir():
            raise UsageError(f"not a directory: {p}")
    names = [n for n in args.cases.split(",") if n] if args.cases else None
    try:
        r = scale_check.check(
            Path(args.checkpoint), Path(args.bundle), Path(args.out), Path(args.qwen_edit), args.side, names
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(json.dumps(r, indent=2))
    return 0


def cmd_check(args) -> int:
    from . import tinyset

    return 0 if tinyset.check(Path(args.engines)) else 1


def _quiet() -> None:
    """Keeps stderr to our own progress lines: no exporter chatter, no progress bars."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def _pin_cpu_capability(argv) -> None:
    """The tiny set's reference vectors are made with torch's AVX2 kernels on every x86 host, so they
    do not depend on the machine (on AVX-512 hosts torch's randn and RoPE frequencies differ in the last
    bit); tests/parity.rs reproduces them with the same flavour. torch reads ATEN_CPU_CAPABILITY when
    it starts, so the command re-runs itself with it set."""
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    os.execve(sys.executable, [sys.executable, "-m", "export", *argv], env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bundle", help="export a diffusers Qwen-Image-Edit checkpoint to a bundle")
    b.add_argument("--checkpoint", required=True, help="local diffusers-format checkpoint directory")
    b.add_argument("--out", required=True, help="bundle directory to write")
    b.add_argument("--variant", help=f"one of {', '.join(VARIANTS)} (default: detected from the checkpoint)")
    b.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (graph weights and activations)")
    b.add_argument("--lightning-lora", help="LoRA .safetensors to fuse into the transformer before export")
    b.add_argument("--lora-scale", type=float, default=1.0)
    b.add_argument("--vae-area", type=int, help="pixel area of the VAE image (default 1024*1024)")
    b.add_argument("--condition-area", type=int, help="Plus: pixel area of the VL image (default 384*384)")
    b.add_argument("--name", help="bundle name recorded in the manifest")
    b.add_argument(
        "--precision",
        default="dtype",
        choices=["dtype", "fp8"],
        help="dtype: every graph in --dtype; fp8: the transformer's linear layers in FP8 (float8e4m3fn Q/DQ), "
        "the rest in --dtype",
    )
    b.add_argument(
        "--fp8-keep",
        action="append",
        default=[],
        metavar="LAYER",
        help="with --precision fp8: also keep these linear layers in --dtype (a module name, or a name within "
        "every block such as img_mlp); repeatable",
    )
    b.add_argument("--calibration-runs", type=int, default=4, help="fp8: denoising runs to calibrate on (default 4)")
    b.add_argument("--calibration-steps", type=int, default=4, help="fp8: steps per calibration run (default 4)")
    b.add_argument("--report", help="write the verification report (JSON; with fp8 the per-layer errors) here")
    b.set_defaults(fn=cmd_bundle)

    t = sub.add_parser("tiny", help="make the tiny checkpoints, bundles and reference vectors")
    t.add_argument("--engines", default="engines", help="output root (default: engines)")
    t.add_argument("--no-references", action="store_true")
    t.add_argument("--report", help="write the verification report (JSON) here")
    t.set_defaults(fn=cmd_tiny)

    s = sub.add_parser(
        "scale-model",
        help="a random checkpoint at the real widths with few layers (export/scale.py; several GB, not committed)",
    )
    s.add_argument("--variant", required=True, help="edit-2509 | edit-2511")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--layers", type=int, default=2, help="transformer blocks (real: 60; default 2)")
    s.add_argument("--text-layers", type=int, default=2, help="language-model layers (real: 28; default 2)")
    s.add_argument(
        "--vision-layers",
        type=int,
        default=2,
        help="vision blocks (real: 32; default 2: one windowed, one full attention)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_scale_model)

    sc = sub.add_parser("scale-check", help="the wide run: qwen-edit edit on an fp32 scale bundle vs diffusers")
    sc.add_argument("--checkpoint", required=True, help="the scale-model checkpoint")
    sc.add_argument("--bundle", required=True, help="its fp32 bundle (`export bundle --dtype float32`)")
    sc.add_argument("--out", required=True, help="directory for the run bundle, images and scale_check.json")
    sc.add_argument("--qwen-edit", default="target/release/qwen-edit", help="the qwen-edit binary")
    sc.add_argument("--side", type=int, default=1024, help="working side in pixels (VAE area side*side; default 1024)")
    sc.add_argument(
        "--cases", default="", help="comma-separated cases (one_image, one_image_cfg, two_images; default: all)"
    )
    sc.set_defaults(fn=cmd_scale_check)

    c = sub.add_parser("check", help="regenerate the tiny set in a temp dir and compare with the committed one")
    c.add_argument("--engines", default="engines")
    c.set_defaults(fn=cmd_check)

    args = ap.parse_args(argv)
    if args.cmd in ("tiny", "check"):
        _pin_cpu_capability(sys.argv[1:] if argv is None else argv)
    _quiet()
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
