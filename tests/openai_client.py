"""The official `openai` Python client (PyPI, pinned in export/requirements.txt) against
`POST /v1/images/edits` of running `qwen-edit serve`s. tests/openai_client.rs starts the servers (the
tiny Edit bundle with an API key and BATCH_SIZE 4; the tiny Edit Plus 2509 bundle) and runs this
script; any failed check exits non-zero with the reason. The last stdout line is a JSON summary.

Checked: one image; n=2 gives /run's images for seed and seed + 1 byte for byte and runs as one batch;
two images through `image[]` on the Plus bundle; `size` and `output_format` honoured; `size="auto"` gives
the reference's size from the last image (diffusers' `calculate_dimensions` over the bundle's
`vae.image_area`, floored to multiples of 16) and the same image as no `size`; mask, an empty
prompt, n out of range, a bad size, a file that is not an image, response_format=url and a wrong key
raise the client's BadRequestError / AuthenticationError with OpenAI's error shape.
"""

import argparse
import base64
import io
import json
import math
import pathlib
import struct
import sys
import urllib.request
import zlib

import httpx2
import openai

STEPS = 2
ENGINES = pathlib.Path(__file__).resolve().parents[1] / "engines"


def auto_size(bundle: str, image: bytes) -> tuple[int, int]:
    """The output size the server derives when `size` is `auto` or absent: diffusers'
    `calculate_dimensions(vae.image_area, width / height)` of the (last) image, each side then floored
    to a multiple of 16 as the server floors every output size. `bundle` is the directory under
    engines/ that tests/openai_client.rs serves."""
    area = json.loads((ENGINES / bundle / "manifest.json").read_text())["vae"]["image_area"]
    w, h = png_size(image)
    ratio = w / h
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32 // 16 * 16, round(height / 32) * 32 // 16 * 16


def recording_client(base: str, key: str) -> tuple[openai.OpenAI, list[bytes]]:
    """A client that keeps the body of every request it sends (to see that a field is on the wire)."""
    sent: list[bytes] = []
    http = httpx2.Client(event_hooks={"request": [lambda request: sent.append(request.read())]})
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=http), sent


def size_sent(body: bytes) -> str | None:
    """The `size` form field of a multipart body the SDK wrote, or None when it sent none."""
    marker = b'name="size"\r\n\r\n'
    at = body.find(marker)
    return None if at < 0 else body[at + len(marker) : body.index(b"\r\n", at + len(marker))].decode()


def png(width: int, height: int, variant: int) -> bytes:
    """A small deterministic RGB PNG."""
    rows = b"".join(
        b"\x00"
        + bytes(
            v for x in range(width) for v in ((x * 4 + variant * 37) % 256, (y * 4 + variant * 11) % 256, (x + y) % 256)
        )
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_size(data: bytes) -> tuple[int, int]:
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "a PNG")
    return struct.unpack(">II", data[16:24])


def check(ok: bool, what: str) -> None:
    if not ok:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def run_image(base: str, key: str, inp: dict) -> dict:
    """POST /run with the JSON API (the reference for the OpenAI route's images)."""
    req = urllib.request.Request(
        f"{base}/run",
        data=json.dumps({"input": inp}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def expect_error(kind: type, call, param, code=None) -> openai.APIStatusError:
    """`call` raises `kind` with OpenAI's error shape ({message, type, param, code})."""
    try:
        call()
    except kind as e:
        body = e.body
        check(isinstance(body, dict), f"{kind.__name__}: error body is an object: {body!r}")
        check(set(body) == {"message", "type", "param", "code"}, f"OpenAI's error keys: {body}")
        check(isinstance(body["message"], str) and body["message"], f"a message: {body}")
        check(e.message.startswith(f"Error code: {e.status_code} - "), f"the SDK's message: {e.message}")
        check(e.param == param, f"param {param!r}: {body}")
        check(code is None or e.code == code, f"code {code!r}: {body}")
        check(e.type == ("invalid_request_error" if e.status_code < 500 else "server_error"), f"type: {body}")
        return e
    except openai.APIStatusError as e:
        check(False, f"expected {kind.__name__}, got {type(e).__name__} {e.status_code}: {e.body}")
    check(False, f"expected {kind.__name__}, the call succeeded")
    raise AssertionError


def edit_checks(base: str, key: str) -> dict:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    image = png(64, 48, 1)

    # One image, as a file object with a name (the SDK sends `image`, filename a.png, image/png).
    f = io.BytesIO(image)
    f.name = "a.png"
    r = client.images.edit(image=f, prompt="make it blue", extra_body={"num_inference_steps": STEPS, "seed": 5})
    check(isinstance(r.created, int) and r.created > 1_600_000_000, f"created: {r.created}")
    check(len(r.data) == 1 and r.output_format == "png", f"one png: {r}")
    out = base64.b64decode(r.data[0].b64_json)
    w, h = png_size(out)
    check(r.size == f"{w}x{h}", f"size {r.size} vs the image's {w}x{h}")
    ref = run_image(
        base,
        key,
        {
            "prompt": "make it blue",
            "image_base64": base64.b64encode(image).decode(),
            "seed": 5,
            "num_inference_steps": STEPS,
        },
    )
    check(ref["image"] == r.data[0].b64_json, "one image: equals /run's with the same seed")
    want = auto_size("tiny", image)
    check(want != png_size(image), f"the reference size differs from the image's own: {want}")
    check(r.size == "{}x{}".format(*want), f"no size: the reference's size {want}, got {r.size}")

    # size="auto" is the default spelled out: the same size and the same image as no size.
    recording, sent = recording_client(base, key)
    auto = recording.images.edit(
        image=("a.png", image, "image/png"),
        prompt="make it blue",
        size="auto",
        extra_body={"num_inference_steps": STEPS, "seed": 5},
    )
    check(size_sent(sent[-1]) == "auto", f"the SDK sent size=auto: {size_sent(sent[-1])!r}")
    auto_png = base64.b64decode(auto.data[0].b64_json)
    check(auto.size == "{}x{}".format(*want), f"size auto: the reference's size {want}, got {auto.size}")
    check(png_size(auto_png) == want, f"size auto: a {want} PNG, got {png_size(auto_png)}")
    check(auto.data[0].b64_json == r.data[0].b64_json, "size auto: the same image as the request without size")

    # n=2: seeds seed and seed + 1, one batch, /run's images byte for byte.
    r = client.images.edit(
        image=("b.png", image, "image/png"),
        prompt="add a hat",
        n=2,
        size="72x40",
        extra_body={"num_inference_steps": STEPS, "seed": 41, "negative_prompt": "blurry", "true_cfg_scale": 3.0},
    )
    check(len(r.data) == 2, f"n=2 gives two images: {len(r.data)}")
    check(r.size == "64x32", f"size 72x40 floored to 64x32: {r.size}")
    extras = [d.model_extra for d in r.data]
    check([e["seed"] for e in extras] == [41, 42], f"seeds 41, 42: {extras}")
    check(all(e["timings"]["batch_size"] == 2 for e in extras), f"the two images ran in one batch: {extras}")
    for i, d in enumerate(r.data):
        check(png_size(base64.b64decode(d.b64_json)) == (64, 32), "64x32 PNG")
        inp = {
            "prompt": "add a hat",
            "image_base64": base64.b64encode(image).decode(),
            "seed": 41 + i,
            "num_inference_steps": STEPS,
            "negative_prompt": "blurry",
            "true_cfg_scale": 3.0,
            "width": 72,
            "height": 40,
        }
        check(run_image(base, key, inp)["image"] == d.b64_json, f"n=2 image {i}: equals /run's with seed {41 + i}")

    # output_format and output_compression.
    r = client.images.edit(
        image=image,
        prompt="p",
        size="48x48",
        output_format="jpeg",
        output_compression=70,
        extra_body={"num_inference_steps": STEPS},
    )
    check(r.output_format == "jpeg" and base64.b64decode(r.data[0].b64_json)[:2] == b"\xff\xd8", "jpeg output")
    check(r.size == "48x48", f"size 48x48: {r.size}")
    r = client.images.edit(
        image=image, prompt="p", size="32x32", output_format="webp", extra_body={"num_inference_steps": STEPS}
    )
    webp = base64.b64decode(r.data[0].b64_json)
    check(r.output_format == "webp" and webp[:4] == b"RIFF" and webp[8:12] == b"WEBP", "webp output")

    # model and user are accepted (and ignored); response_format b64_json is the default.
    r = client.images.edit(
        image=image,
        prompt="p",
        size="32x32",
        model="gpt-image-1",
        user="u-1",
        response_format="b64_json",
        extra_body={"num_inference_steps": STEPS},
    )
    check(len(r.data) == 1 and r.data[0].b64_json, "model/user accepted")

    # Errors: BadRequestError with OpenAI's shape and the field at fault.
    small = {"num_inference_steps": STEPS}
    expect_error(
        openai.BadRequestError,
        lambda: client.images.edit(image=image, mask=image, prompt="p", extra_body=small),
        "mask",
    )
    expect_error(
        openai.BadRequestError,
        lambda: client.images.edit(image=image, prompt="  ", extra_body=small),
        "prompt",
        "validation_error",
    )
    expect_error(
        openai.BadRequestError, lambda: client.images.edit(image=image, prompt="p", n=0, extra_body=small), "n"
    )
    expect_error(
        openai.BadRequestError, lambda: client.images.edit(image=image, prompt="p", n=11, extra_body=small), "n"
    )
    expect_error(
        openai.BadRequestError,
        lambda: client.images.edit(image=image, prompt="p", size="huge", extra_body=small),
        "size",
    )
    expect_error(
        openai.BadRequestError,
        lambda: client.images.edit(image=image, prompt="p", size="8x8", extra_body=small),
        "size",
        "validation_error",
    )
    e = expect_error(
        openai.BadRequestError,
        lambda: client.images.edit(
            image=("notes.png", b"hello, not an image", "image/png"), prompt="p", extra_body=small
        ),
        "image",
    )
    check(e.code in ("unsupported_image_format", "invalid_image"), f"not an image: {e.code}")
    expect_error(
        openai.BadRequestError,
        lambda: client.images.edit(image=image, prompt="p", response_format="url", extra_body=small),
        "response_format",
    )
    expect_error(openai.BadRequestError, lambda: client.images.edit(image=[], prompt="p", extra_body=small), "image")
    expect_error(
        openai.BadRequestError,
        lambda: client.images.edit(image=[image, image], prompt="p", extra_body=small),
        "image",
        "validation_error",
    )
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-key", max_retries=0)
    expect_error(
        openai.AuthenticationError, lambda: wrong.images.edit(image=image, prompt="p"), None, "invalid_api_key"
    )
    return {"one": True, "n2": True, "formats": True, "errors": True}


def plus_checks(base: str) -> dict:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    first, second = png(64, 48, 2), png(48, 64, 3)
    r = client.images.edit(
        image=[("one.png", first, "image/png"), ("two.png", second, "image/png")],
        prompt="put picture 1 into picture 2",
        size="48x32",
        extra_body={"num_inference_steps": STEPS, "seed": 3},
    )
    check(
        len(r.data) == 1 and png_size(base64.b64decode(r.data[0].b64_json)) == (48, 32),
        f"Plus: two images through image[]: {r.size}",
    )
    inp = {
        "prompt": "put picture 1 into picture 2",
        "images": [
            {"image_base64": base64.b64encode(first).decode()},
            {"image_base64": base64.b64encode(second).decode()},
        ],
        "seed": 3,
        "num_inference_steps": STEPS,
        "width": 48,
        "height": 32,
    }
    check(run_image(base, "unused", inp)["image"] == r.data[0].b64_json, "Plus: equals /run's images list, in order")
    swapped = client.images.edit(
        image=[second, first],
        prompt="put picture 1 into picture 2",
        size="48x32",
        extra_body={"num_inference_steps": STEPS, "seed": 3},
    )
    check(swapped.data[0].b64_json != r.data[0].b64_json, "Plus: the order of image[] matters")

    # size="auto" on Plus: the size comes from the last image (portrait), not the first (landscape),
    # and the image equals the request without size.
    want = auto_size("tiny-2509", second)
    check(want != auto_size("tiny-2509", first), f"the two images' reference sizes differ: {want}")
    images = [("one.png", first, "image/png"), ("two.png", second, "image/png")]
    extra = {"num_inference_steps": STEPS, "seed": 3}
    recording, sent = recording_client(base, "unused")
    auto = recording.images.edit(image=images, prompt="put picture 1 into picture 2", size="auto", extra_body=extra)
    plain = recording.images.edit(image=images, prompt="put picture 1 into picture 2", extra_body=extra)
    check([size_sent(b) for b in sent] == ["auto", None], f"size=auto, then no size: {[size_sent(b) for b in sent]}")
    check(
        auto.size == "{}x{}".format(*want), f"Plus size auto: the last image's reference size {want}, got {auto.size}"
    )
    check(png_size(base64.b64decode(auto.data[0].b64_json)) == want, f"Plus size auto: a {want} PNG")
    check(plain.size == auto.size, f"Plus: no size gives auto's size: {plain.size} vs {auto.size}")
    check(auto.data[0].b64_json == plain.data[0].b64_json, "Plus size auto: the same image as the request without size")
    return {"plus": True, "auto": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the Edit server, http://127.0.0.1:PORT")
    parser.add_argument("--key", required=True)
    parser.add_argument("--plus", required=True, help="the Edit Plus (2509) server, no key")
    args = parser.parse_args()
    summary = {"ok": True, "openai": openai.__version__}
    summary.update(edit_checks(args.base, args.key))
    summary.update(plus_checks(args.plus))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
