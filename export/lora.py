"""Fuses a (Lightning) LoRA into the transformer weights before export: W += scale * up @ down.

Reads every LoRA layout diffusers reads for Qwen-Image (kohya `lora_unet_*`, `diffusion_model.*`,
`lora_down/lora_up/alpha`, peft `lora_A/lora_B`) through diffusers' own key conversion, so a file
that works with `pipe.load_lora_weights` works here; the fusion itself is done here, without peft.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .variants import UsageError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pairs(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (down [r, in], up [out, r]) with alpha/rank already folded in (as diffusers does)."""
    from diffusers import QwenImageEditPipeline

    if not path.is_file():
        raise UsageError(f"LoRA file not found: {path}")
    try:
        sd = QwenImageEditPipeline.lora_state_dict(str(path))
    except Exception as e:  # corrupt file or a layout diffusers cannot read
        raise UsageError(f"cannot read LoRA {path}: {e}") from e
    if isinstance(sd, tuple):
        sd = sd[0]
    pairs: dict[str, list] = {}
    unknown = []
    for key, value in sd.items():
        k = key.removeprefix("transformer.")
        if k.endswith(".lora_A.weight"):
            pairs.setdefault(k[: -len(".lora_A.weight")], [None, None])[0] = value
        elif k.endswith(".lora_B.weight"):
            pairs.setdefault(k[: -len(".lora_B.weight")], [None, None])[1] = value
        else:
            unknown.append(key)
    if unknown:
        raise UsageError(f"LoRA {path.name}: keys that are not LoRA weights: {', '.join(unknown[:5])}")
    incomplete = [m for m, (a, b) in pairs.items() if a is None or b is None]
    if incomplete:
        raise UsageError(f"LoRA {path.name}: down/up pair incomplete for {', '.join(incomplete[:5])}")
    if not pairs:
        raise UsageError(f"LoRA {path.name} holds no LoRA weights")
    return {m: (a, b) for m, (a, b) in pairs.items()}


def fuse(transformer: torch.nn.Module, path: Path, scale: float = 1.0) -> dict:
    """Adds the LoRA in `path` into `transformer` in place; returns the manifest record."""
    path = Path(path)
    pairs = load_pairs(path)
    modules = dict(transformer.named_modules())
    missing = [m for m in pairs if not isinstance(modules.get(m), torch.nn.Linear)]
    if missing:
        raise UsageError(
            f"LoRA {path.name} does not match this transformer: {len(missing)} of {len(pairs)} modules not found "
            f"(e.g. {', '.join(sorted(missing)[:3])}); is it a LoRA for this model?"
        )
    ranks = set()
    with torch.no_grad():
        for name, (down, up) in pairs.items():
            lin = modules[name]
            if down.shape[1] != lin.in_features or up.shape[0] != lin.out_features or down.shape[0] != up.shape[1]:
                raise UsageError(
                    f"LoRA {path.name}: {name} has down {tuple(down.shape)} / up {tuple(up.shape)}, "
                    f"the layer is {lin.out_features}x{lin.in_features}"
                )
            ranks.add(down.shape[0])
            delta = (up.to(torch.float32) @ down.to(torch.float32)) * scale
            lin.weight.add_(delta.to(lin.weight.dtype))
    return {
        "lora": path.name,
        "sha256": _sha256(path),
        "modules": len(pairs),
        "rank": max(ranks),
        "scale": scale,
    }
