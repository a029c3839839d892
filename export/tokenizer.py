"""Tiny byte-level BPE tokenizer with Qwen2's pre-tokenizer and the Qwen2.5 special tokens.

The vocabulary size is searched so that the edit pipelines' system-prompt prefix is exactly
`drop_tokens` (64) tokens long, as with the real Qwen2 tokenizer: the pipeline drops that many.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2's split pattern, verbatim from the real tokenizer.json.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens in Qwen2.5's id order (151643...). The first 14 are special.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
NON_SPECIAL_ADDED = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

# Training text: generic English about images and edits, plus the pipeline's system prompt.
CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate.",
    "Make the sky blue and add a red balloon. Replace the cat with a small dog sitting on the grass.",
    "Change the background to a sunny beach, keep the person unchanged. Turn the photo into a watercolor painting.",
    "Remove the text from the sign and make the car green. Add snow on the roof and warm light in the windows.",
    "A picture of a house with a garden, trees, flowers and a wooden fence under a cloudy evening sky.",
    "The user wants a brighter image with more contrast, softer shadows and a vintage film look.",
    "Picture 1 shows a person; picture 2 shows a jacket. Put the jacket from picture 2 on the person in picture 1.",
    "Write the words 'Qwen Edit' on the mug in bold letters, 0 1 2 3 4 5 6 7 8 9.",
    "system\nuser\nassistant\n",
]


def _base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def build(vocab_size: int) -> Tokenizer:
    """Trains the BPE on CORPUS to `vocab_size` BPE tokens, then appends the added tokens."""
    tok = _base_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(NON_SPECIAL_ADDED)
    return tok


def build_with_prefix_len(prefix: str, target: int, lo: int = 257, hi: int = 2048) -> Tokenizer:
    """Smallest vocabulary size whose tokenizer encodes `prefix` to exactly `target` tokens."""
    for size in range(lo, hi):
        tok = build(size)
        n = len(tok.encode(prefix, add_special_tokens=False).ids)
        if n == target:
            return tok
        if n < target:
            break
    raise RuntimeError(f"no vocabulary size in [{lo}, {hi}) encodes the prefix to {target} tokens")
