"""Golden data for `src/imaging`: PIL resize outputs, diffusers pre/postprocess vectors, decode fixtures.

Run from the repo root: `.venv/bin/python -m export.goldens.imaging`. Deterministic: every input is
made here from integer formulas (no RNG library), so CI can regenerate and compare byte for byte.

Writes
  tests/golden/imaging/resize/manifest.json + raw RGB8 files (sources and PIL outputs)
  tests/golden/imaging/resize_large.json    sha256 of PIL resizes of larger generated images
  tests/golden/imaging/{preprocess,postprocess}_*.npy   diffusers VaeImageProcessor vectors
  tests/golden/imaging/decode/*.rgb + decode.json        PIL's decode of each fixture
  tests/fixtures/images/*                   small encoded images for the decode tests
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
GOLD = ROOT / "tests" / "golden" / "imaging"
FIX = ROOT / "tests" / "fixtures" / "images"

FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}


def make_source(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradient + LCG noise + sharp edges; mirrored exactly by `gen_source` in the Rust tests."""
    state = seed & 0x7FFFFFFF
    out = bytearray(w * h * 3)
    i = 0
    denom = w * 3 + h * 5
    for y in range(h):
        for x in range(w):
            for c in range(3):
                state = (state * 1103515245 + 12345) & 0x7FFFFFFF
                noise = ((state >> 16) & 0x3F) - 32
                g = ((x * 3 + y * 5 + c * 40) * 255) // denom
                v = min(max(g + noise, 0), 255)
                if x > w // 2 and ((x // 8) + (y // 8)) % 2 == 0:
                    v = 255 - v  # checkerboard with hard edges on the right half
                if x == y or x + 1 == y:
                    v = 0 if c != 1 else 255  # a sharp diagonal line
                out[i] = v
                i += 1
    return Image.frombytes("RGB", (w, h), bytes(out))


# (name, w, h, seed) -> target sizes: up, down, mixed ratios, one axis unchanged, tiny.
SOURCES = [("s37x23", 37, 23, 1), ("s64x64", 64, 64, 2), ("s100x61", 100, 61, 3), ("s7x300", 7, 300, 4)]


def targets(w: int, h: int) -> list[tuple[int, int]]:
    t = [
        (w + w // 3 + 2, h + h // 2 + 1),  # up both
        (max(w // 3, 1), max(h // 2, 1)),  # down both
        (w + w // 2, max(h * 2 // 3, 1)),  # up x, down y
        (max(w * 3 // 5, 1), h + 7),  # down x, up y
        (w, h * 3 // 2),  # vertical pass only
        (w // 2 + 1, h),  # horizontal pass only
        (1, h),  # 1 column
        (w, 1),  # 1 row
        (1, 1),
        (3, 5),
        (w, h),  # identity: PIL returns a copy
    ]
    if w > 2 and h > 5:
        # Pillow 13 runs the vertical pass first iff the height shrinks by more than twice as
        # many pixels as the width: one case on each side of that boundary.
        t += [(w - 2, h - 5), (w - 2, h - 4)]
    seen, out = set(), []
    for s in t:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# Larger, request-like resizes checked by hash only (sources are regenerated in Rust).
LARGE = [
    ("l640x480", 640, 480, 11, (1184, 880), "lanczos"),
    ("l640x480", 640, 480, 11, (448, 336), "bicubic"),
    ("l640x480", 640, 480, 11, (384, 384), "lanczos"),
    ("l301x517", 301, 517, 12, (608, 1056), "lanczos"),
    ("l301x517", 301, 517, 12, (280, 476), "bicubic"),
    ("l1000x90", 1000, 90, 13, (97, 1000), "bicubic"),
    ("l640x480", 640, 480, 11, (600, 399), "lanczos"),  # vertical pass first
    ("l640x480", 640, 480, 11, (600, 400), "bicubic"),  # boundary: horizontal first
    ("l301x517", 301, 517, 12, (320, 300), "lanczos"),  # width grows, height shrinks
]


def write_resize() -> None:
    d = GOLD / "resize"
    d.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    cases = []
    for name, w, h, seed in SOURCES:
        src = make_source(w, h, seed)
        (d / f"{name}.rgb").write_bytes(src.tobytes())
        for fname, filt in FILTERS.items():
            for tw, th in targets(w, h):
                out = src.resize((tw, th), filt)
                fn = f"{name}_{fname}_{tw}x{th}.rgb"
                (d / fn).write_bytes(out.tobytes())
                cases.append({"source": name, "filter": fname, "width": tw, "height": th, "file": fn})
    manifest = {
        "pillow": Image.__version__ if hasattr(Image, "__version__") else None,
        "sources": [{"name": n, "width": w, "height": h, "seed": s, "file": f"{n}.rgb"} for n, w, h, s in SOURCES],
        "cases": cases,
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    large = []
    for name, w, h, seed, (tw, th), fname in LARGE:
        src = make_source(w, h, seed)
        out = src.resize((tw, th), FILTERS[fname])
        large.append(
            {
                "source": name,
                "width": w,
                "height": h,
                "seed": seed,
                "source_sha256": hashlib.sha256(src.tobytes()).hexdigest(),
                "filter": fname,
                "target_width": tw,
                "target_height": th,
                "sha256": hashlib.sha256(out.tobytes()).hexdigest(),
            }
        )
    (GOLD / "resize_large.json").write_text(json.dumps(large, indent=1) + "\n")


def write_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    path.write_bytes(buf.getvalue())


def write_processor() -> None:
    from diffusers.image_processor import VaeImageProcessor

    # The Qwen-Image pipelines use VaeImageProcessor(vae_scale_factor=8 * 2): lanczos, no reducing gap.
    proc = VaeImageProcessor(vae_scale_factor=16)

    # Every u8 value in every channel, no resize: exhaustive check of pil_to_numpy + normalize.
    vals = np.arange(256, dtype=np.uint8).reshape(16, 16)
    allv = np.stack([vals, vals[::-1], vals.T], axis=-1)
    img = Image.fromarray(allv, mode="RGB")
    pre = proc.preprocess(img, height=16, width=16)
    assert pre.dtype == torch.float32
    write_npy(GOLD / "preprocess_allvalues_u8.npy", allv)
    write_npy(GOLD / "preprocess_allvalues.npy", pre.numpy())
    write_npy(
        GOLD / "preprocess_allvalues_f16bits.npy", pre.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    )

    # Resize (PIL lanczos) + normalize on a generated source, as the pipeline does for the VAE image.
    src = make_source(64, 64, 2)
    pre = proc.preprocess(src, height=48, width=80)
    write_npy(GOLD / "preprocess_s64x64_to_80x48.npy", pre.numpy())

    # Postprocess: values across and beyond [-1, 1], including exact .5 ties after *255.
    vs = [np.float32(-1.5), np.float32(-1.0), np.float32(0.0), np.float32(1.0), np.float32(1.5)]
    for k in range(256):
        y = np.float32((k + 0.5) / 255.0)
        x = np.float32((y - np.float32(0.5)) * np.float32(2.0))
        vs += [np.nextafter(x, np.float32(-2)), x, np.nextafter(x, np.float32(2))]
        vs.append(np.float32(2.0 * k / 255.0 - 1.0))
    n = 8 * 20
    lin = np.linspace(-1.2, 1.2, 3 * n * 2 - len(vs) % (3 * n), dtype=np.float32)
    flat = np.concatenate([np.array(vs, dtype=np.float32), lin])
    flat = flat[: (len(flat) // (3 * n)) * 3 * n]
    h = len(flat) // (3 * n)
    x = torch.from_numpy(flat.reshape(1, 3, h, n).copy())
    out = proc.postprocess(x, output_type="pil")[0]
    write_npy(GOLD / "postprocess_in.npy", x.numpy())
    write_npy(GOLD / "postprocess_out_hwc_u8.npy", np.asarray(out, dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_rgb16(w: int, h: int) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one), rows of big-endian u16 with filter byte 0."""
    raw = bytearray()
    for y in range(h):
        raw.append(0)
        for x in range(w):
            for c in range(3):
                v = (x * 4099 + y * 7919 + c * 20011) * 37 % 65536
                raw += struct.pack(">H", v)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(bytes(raw), 9))
        + png_chunk(b"IEND", b"")
    )


def png_bomb() -> bytes:
    """A valid-looking PNG header claiming 50000x50000 RGB; the pixel data is absent."""
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def exif_with_orientation(o: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


def write_fixtures() -> None:
    FIX.mkdir(parents=True, exist_ok=True)
    dd = GOLD / "decode"
    dd.mkdir(parents=True, exist_ok=True)
    for f in dd.iterdir():
        f.unlink()
    base = make_source(24, 16, 5)
    files: dict[str, bytes] = {}

    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        img.save(b, format=fmt, **kw)
        return b.getvalue()

    files["exif6.jpg"] = save(base, "JPEG", quality=90, exif=exif_with_orientation(6))
    files["plain420.jpg"] = save(make_source(33, 19, 6), "JPEG", quality=85, subsampling=2)
    files["gray.jpg"] = save(base.convert("L"), "JPEG", quality=90)
    files["progressive.jpg"] = save(make_source(40, 24, 7), "JPEG", quality=80, progressive=True)
    files["cmyk.jpg"] = save(make_source(20, 12, 8).convert("CMYK"), "JPEG", quality=90)
    files["truncated.jpg"] = files["plain420.jpg"][: len(files["plain420.jpg"]) * 3 // 5]
    files["gray.png"] = save(base.convert("L"), "PNG")
    gray_a = base.convert("LA")
    files["gray_alpha.png"] = save(gray_a, "PNG")
    rgba = base.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    files["rgba.png"] = save(rgba, "PNG")
    files["palette.png"] = save(base.quantize(colors=16, dither=Image.Dither.NONE), "PNG")
    pal_t = base.quantize(colors=8, dither=Image.Dither.NONE)
    files["palette_trns.png"] = save(pal_t, "PNG", transparency=0)
    g16 = Image.frombytes("I;16", (24, 16), bytes((i * 37) % 256 for i in range(24 * 16 * 2)))
    files["gray16.png"] = save(g16, "PNG")
    files["rgb16.png"] = png_rgb16(13, 9)
    files["exif3.png"] = save(base, "PNG", exif=exif_with_orientation(3))
    files["bomb.png"] = png_bomb()
    files["lossy.webp"] = save(base, "WEBP", quality=80, method=4)
    files["lossless.webp"] = save(base, "WEBP", lossless=True)
    files["rgba_lossless.webp"] = save(rgba, "WEBP", lossless=True, exact=True)
    files["exif8_lossless.webp"] = save(base, "WEBP", lossless=True, exif=exif_with_orientation(8))

    expected = {}
    for name, data in sorted(files.items()):
        (FIX / name).write_bytes(data)
        try:
            im = Image.open(io.BytesIO(data))
            im = ImageOps.exif_transpose(im)
            rgb = im.convert("RGB")
        except Exception as e:  # truncated / bomb: PIL refuses too
            expected[name] = {"pil_error": type(e).__name__}
            continue
        fn = name.replace(".", "_") + ".rgb"
        (dd / fn).write_bytes(rgb.tobytes())
        expected[name] = {
            "mode": Image.open(io.BytesIO(data)).mode,
            "width": rgb.width,
            "height": rgb.height,
            "file": fn,
        }
    (GOLD / "decode.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


def main() -> None:
    GOLD.mkdir(parents=True, exist_ok=True)
    write_resize()
    write_processor()
    write_fixtures()
    total = sum(f.stat().st_size for f in GOLD.rglob("*") if f.is_file())
    print(f"imaging goldens: {total} bytes under {GOLD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
