"""The official `runpod` Python client (PyPI, pinned in export/requirements.txt) against the /v2 layout
of a running `qwen-edit serve`. tests/runpod_client.rs starts the server and runs this script; any
failed check exits non-zero with the reason.

Checked: Endpoint.run / Job.status / Job.output give /run's image byte for byte (same seed), run_sync
too, health, a bad input ends FAILED with its error, a cancelled queued job ends CANCELLED, purge_queue,
an unknown id is a 404 (requests.HTTPError), a wrong key a RuntimeError, and the asyncio client.
The server runs with BATCH_SIZE=1 (two async jobs at a time), so that two slow jobs keep others queued.
"""

import argparse
import asyncio
import base64
import json
import struct
import sys
import zlib

import aiohttp
import requests
import runpod
from runpod.endpoint.runner import Job

ENDPOINT = "qwen-edit"


def png(side: int, variant: int) -> bytes:
    """A small deterministic RGB PNG."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(side) for v in ((x * 4 + variant * 37) % 256, (y * 4) % 256, (x + y) % 256))
        for y in range(side)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def edit(i: int, steps: int = 2, side: int = 32) -> dict:
    image = base64.b64encode(png(side, i)).decode()
    return {"prompt": f"client edit {i}", "image_base64": image, "seed": 900 + i, "num_inference_steps": steps}


def check(ok: bool, what: str) -> None:
    if not ok:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    # Set before any Endpoint is made: the client reads them at construction.
    runpod.endpoint_url_base = f"{args.base}/v2"
    runpod.api_key = args.key
    bearer = {"Authorization": f"Bearer {args.key}"}

    def run_image(inp: dict) -> str:
        r = requests.post(f"{args.base}/run", json={"input": inp}, headers=bearer, timeout=120)
        r.raise_for_status()
        return r.json()["image"]

    ep = runpod.Endpoint(ENDPOINT)
    health = ep.health()
    check(health["workers"]["ready"] == 1 and "inQueue" in health["jobs"], f"health: {health}")

    # run / status / output: /run's image, byte for byte.
    inputs = [edit(i) for i in range(3)]
    jobs = [ep.run(inp) for inp in inputs]
    for job, inp in zip(jobs, inputs, strict=True):
        check(job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), "status of a new job")
        out = job.output(timeout=120)
        check(out is not None and out["image"] == run_image(inp), f"job {job.job_id}: output differs from /run")
        check(job.status() == "COMPLETED", "status after the output")
    out = ep.run_sync(inputs[0], timeout=120)
    check(out["image"] == run_image(inputs[0]), "run_sync output differs from /run")

    # A bad input ends FAILED with the error (the client's output is then None).
    bad = ep.run({"prompt": "", "image_base64": inputs[0]["image_base64"]})
    check(bad.output(timeout=60) is None, "a failed job has no output")
    check(bad.status() == "FAILED", f"bad input: {bad.status()}")
    record = requests.get(f"{args.base}/v2/{ENDPOINT}/status/{bad.job_id}", headers=bearer, timeout=10).json()
    error = json.loads(record["error"])
    check(error["error_type"] == "validation_error" and "prompt" in error["error_message"], f"error: {record}")
    check(ep.run_sync({"prompt": "x"}, timeout=60) is None, "run_sync of a bad input returns None")

    # Two slow jobs take both running places; the next one waits in the queue and is cancelled there.
    slow = [ep.run(edit(10 + k, steps=40, side=96)) for k in range(2)]
    target = ep.run(edit(20))
    check(target.status() == "IN_QUEUE", "the job behind two slow ones is queued")
    cancelled = target.cancel()
    check(cancelled == {"id": target.job_id, "status": "CANCELLED"}, f"cancel: {cancelled}")
    check(target.status() == "CANCELLED", "a cancelled queued job ends CANCELLED")
    queued = [ep.run(edit(30 + k)) for k in range(3)]
    purged = ep.purge_queue()
    check(purged["status"] == "completed" and purged["removed"] == 3, f"purge_queue: {purged}")
    check(all(j.status() == "CANCELLED" for j in queued), "purged jobs end CANCELLED")
    for job in slow:
        job.cancel()

    # An unknown id is a 404; a wrong key a 401 (the client's RuntimeError).
    try:
        Job(ENDPOINT, "no-such-job", ep.rp_client).status()
        check(False, "an unknown id must fail")
    except requests.HTTPError as e:
        check(e.response.status_code == 404, f"unknown id: {e}")
    try:
        runpod.Endpoint(ENDPOINT, api_key="wrong").health()
        check(False, "a wrong key must fail")
    except RuntimeError as e:
        check("401" in str(e), f"wrong key: {e}")

    async def with_asyncio() -> None:
        async with aiohttp.ClientSession() as session:
            aep = runpod.AsyncioEndpoint(ENDPOINT, session)
            job = await aep.run(inputs[1])
            check(await job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), "asyncio status")
            out = await job.output(timeout=120)
            check(out["image"] == run_image(inputs[1]), "asyncio output differs from /run")
            check((await aep.health())["jobs"]["completed"] >= 4, "asyncio health")

    asyncio.run(with_asyncio())
    print(json.dumps({"ok": True, "runpod": runpod.__version__, "health": ep.health()}))


if __name__ == "__main__":
    main()
