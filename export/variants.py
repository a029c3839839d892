"""The Qwen-Image-Edit variants the exporter knows: prompt templates, working areas, pipeline class.

Templates are verbatim from diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
EDIT_TEMPLATE = SYSTEM_PREFIX + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_TEMPLATE = SYSTEM_PREFIX + "{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_IMAGE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
DROP_TOKENS = 64


@dataclass(frozen=True)
class Variant:
    name: str  # CLI name
    kind: str  # manifest `variant`: "edit" | "edit-plus"
    zero_cond_t: bool

    @property
    def plus(self) -> bool:
        return self.kind == "edit-plus"

    @property
    def template(self) -> str:
        return PLUS_TEMPLATE if self.plus else EDIT_TEMPLATE

    @property
    def image_template(self) -> str | None:
        return PLUS_IMAGE_TEMPLATE if self.plus else None

    def pipeline_class(self):
        from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

        return QwenImageEditPlusPipeline if self.plus else QwenImageEditPipeline


VARIANTS = {
    "edit": Variant("edit", "edit", zero_cond_t=False),
    "edit-2509": Variant("edit-2509", "edit-plus", zero_cond_t=False),
    "edit-2511": Variant("edit-2511", "edit-plus", zero_cond_t=True),
}


class UsageError(Exception):
    """Bad use of the export tool: reported as one clear line, exit code 2."""


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UsageError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}") from None


def detect_variant(checkpoint_dir) -> Variant:
    """Variant of a diffusers checkpoint from model_index.json and the transformer config."""
    import json
    from pathlib import Path

    d = Path(checkpoint_dir)
    index = d / "model_index.json"
    if not index.is_file():
        raise UsageError(f"{d} is not a diffusers checkpoint: {index} is missing")
    cls = json.loads(index.read_text()).get("_class_name", "")
    tcfg_path = d / "transformer" / "config.json"
    zero = json.loads(tcfg_path.read_text()).get("zero_cond_t", False) if tcfg_path.is_file() else False
    if cls == "QwenImageEditPipeline":
        return VARIANTS["edit"]
    if cls == "QwenImageEditPlusPipeline":
        return VARIANTS["edit-2511" if zero else "edit-2509"]
    raise UsageError(f"{index}: pipeline class {cls!r} is not a Qwen-Image-Edit pipeline")
