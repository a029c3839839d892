//! The text side of the Qwen2.5-VL text encoder: prompt template, `<|image_pad|>` expansion, tokens,
//! 3-D mRoPE positions and which vision token each placeholder receives, for a right-padded batch.
//!
//! Reference: diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline._get_qwen_prompt_embeds`
//! (text = `template.format([image prefix +] prompt)`), transformers' `Qwen2VLProcessor` (each
//! `<|image_pad|>` becomes `grid_t*grid_h*grid_w / merge^2` copies, tokenized with `padding=True`:
//! right padding with `<|endoftext|>`; `mm_token_type_ids` 1 = image, 2 = video) and
//! `Qwen2_5_VLModel.get_rope_index` (3-D positions; padding keeps the 0 it is initialised with) and
//! `get_placeholder_mask` + `masked_scatter` (placeholders, row-major over the batch, take the
//! concatenated vision tokens in order).
//!
//! Deviation on purpose: diffusers 0.42.1 does not pass `mm_token_type_ids`, so HF falls back to 1-D
//! positions; we compute the 3-D positions the model was trained with (as diffusers PR #14189 does).
//!
//! Rows refer to images by slot (index into the `VisionBatch`), so one image shared by several rows
//! (true CFG: cond and uncond) is encoded once and all its rows point at the same vision tokens.

use std::path::Path;

use ndarray::{Array2, Array3, ArrayView3};
use tokenizers::Tokenizer;

use super::vision::{ImageGrid, Vision, VisionBatch};
pub use crate::bundle::Prompt;
use crate::runtime::{RowCopy, Tensor};

/// The image placeholder of the templates, expanded to one token per merged vision token.
pub const IMAGE_TOKEN: &str = "<|image_pad|>";
/// The video placeholder: never valid in a prompt here (the reference refuses it without videos).
pub const VIDEO_TOKEN: &str = "<|video_pad|>";
/// The padding token of the Qwen2 tokenizer (`tokenizer_config.json` `pad_token`).
pub const PAD_TOKEN: &str = "<|endoftext|>";

/// Errors of prompt preparation. [`PromptError::is_bad_input`] tells the request's fault from the bundle's.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("tokenizer file {path} not found: the model bundle must contain its tokenizer.json")]
    TokenizerMissing { path: String },
    #[error("cannot load tokenizer {path}: {reason} (is it a Hugging Face tokenizer.json?)")]
    TokenizerLoad { path: String, reason: String },
    #[error("the tokenizer does not match the model: {0}")]
    TokenizerMismatch(String),
    #[error("invalid prompt template in the bundle manifest: {0}")]
    Template(String),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("prompt {row} is too long: {tokens} text tokens, the model accepts at most {max}; shorten the prompt")]
    TooLong { row: usize, tokens: usize, max: usize },
    #[error("prompt {row} contains the reserved token `{token}`, which only the pipeline may place; remove it")]
    ReservedToken { row: usize, token: &'static str },
    #[error("prompt {row} has {images} image(s) but its template has {placeholders} image placeholder(s)")]
    ImageCount { row: usize, images: usize, placeholders: usize },
    #[error("prompt {row} refers to image slot {slot} but the batch has {slots} image(s)")]
    BadSlot { row: usize, slot: usize, slots: usize },
    #[error("no prompts to encode")]
    EmptyBatch,
    #[error("{0}")]
    Internal(String),
}

impl PromptError {
    /// Whether the request is at fault (HTTP 4xx), rather than the bundle or the code.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, PromptError::TooLong { .. } | PromptError::ReservedToken { .. })
    }
}

const SYSTEM_PREFIX: &str = "<|im_start|>system\nDescribe the key features of the input image (color, shape, \
size, texture, objects, background), then explain how the user's text instruction should alter or modify the \
image. Generate a new image that meets the user's requirements while maintaining consistency with the original \
input where appropriate.<|im_end|>\n<|im_start|>user\n";

/// The manifest's `prompt` section (declared in `bundle`): the reference's templates.
impl Prompt {
    /// QwenImageEditPipeline (v1), verbatim; `max_text_tokens` is the caller's choice.
    pub fn qwen_image_edit(max_text_tokens: usize) -> Self {
        Prompt {
            template: format!(
                "{}<|vision_start|><|image_pad|><|vision_end|>{{}}<|im_end|>\n<|im_start|>assistant\n",
                SYSTEM_PREFIX.replace('{', "{{").replace('}', "}}")
            ),
            image_template: None,
            drop_tokens: 64,
            max_text_tokens,
        }
    }

    /// QwenImageEditPlusPipeline (2509/2511), verbatim.
    pub fn qwen_image_edit_plus(max_text_tokens: usize) -> Self {
        Prompt {
            template: format!("{}{{}}<|im_end|>\n<|im_start|>assistant\n", SYSTEM_PREFIX.replace('{', "{{").replace('}', "}}")),
            image_template: Some("Picture {}: <|vision_start|><|image_pad|><|vision_end|>".to_string()),
            drop_tokens: 64,
            max_text_tokens,
        }
    }
}

/// Python's `template.format(arg)` for templates whose fields are `{}` / `{0}` (`{{`, `}}` escape).
/// Returns the text and the number of fields replaced.
pub fn format_one(template: &str, arg: &str) -> Result<(String, usize), String> {
    let mut out = String::with_capacity(template.len() + arg.len());
    let mut chars = template.chars().peekable();
    let (mut auto, mut manual) = (0usize, 0usize);
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '{' => {
                let mut field = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => field.push(ch),
                        None => return Err("unclosed `{` in template".into()),
                    }
                }
                match field.as_str() {
                    "" => auto += 1,
                    "0" => manual += 1,
                    f => return Err(format!("unsupported field `{{{f}}}`: only `{{}}` (the user text) is allowed")),
                }
                if auto > 1 {
                    return Err("more than one `{}` field: the template takes one argument".into());
                }
                if auto > 0 && manual > 0 {
                    return Err("cannot mix `{}` and `{0}` fields".into());
                }
                out.push_str(arg);
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '}' => return Err("single `}` in template (write `}}` for a literal brace)".into()),
            c => out.push(c),
        }
    }
    Ok((out, auto + manual))
}

/// One prompt row of a batch: its user text and the slots (indices into the batch's images) of its
/// images, in placeholder order.
#[derive(Clone, Copy, Debug)]
pub struct PromptRow<'a> {
    pub text: &'a str,
    pub images: &'a [usize],
}

/// The text inputs of the text encoder for a batch, row-major, right-padded to `seq`.
#[derive(Clone, Debug, PartialEq)]
pub struct TextBatch {
    pub batch: usize,
    pub seq: usize,
    /// [batch, seq], padding = `<|endoftext|>`.
    pub input_ids: Vec<i64>,
    /// [batch, seq], 1 = token, 0 = padding.
    pub attention_mask: Vec<i64>,
    /// [batch, seq], 0 text, 1 image placeholder, 2 video placeholder (what `get_rope_index` reads).
    pub mm_token_type_ids: Vec<i64>,
    /// [3, batch, seq]: (temporal, height, width) mRoPE positions; 0 at padding.
    pub position_ids: Vec<i64>,
    /// [batch, seq]: for each `<|image_pad|>` the merged vision token it receives, else -1.
    pub image_embed_index: Vec<i64>,
    /// Valid tokens of each row (before padding).
    pub lengths: Vec<usize>,
    /// Leading tokens of each row whose hidden states the pipeline drops.
    pub drop_tokens: usize,
}

impl TextBatch {
    /// Tokens each row keeps after the system prompt is dropped.
    pub fn kept_lengths(&self) -> Vec<usize> {
        self.lengths.iter().map(|l| l - self.drop_tokens).collect()
    }

    /// [`TextBatch::prompt_embeds`] as a gather, for hidden states that stay where the encoder computed them:
    /// the embeddings' shape [batch, seq - drop_tokens, dim], the element copies out of the encoder's
    /// [batch, seq, dim] output (the rest is zeros), and the mask.
    pub fn embed_copies(&self, dim: usize) -> ([usize; 3], Vec<RowCopy>, Array2<i64>) {
        let max = self.seq - self.drop_tokens;
        let mut mask = Array2::<i64>::zeros((self.batch, max));
        let mut copies = Vec::with_capacity(self.batch);
        for (r, &len) in self.lengths.iter().enumerate() {
            let kept = len - self.drop_tokens;
            copies.push(RowCopy { src: (r * self.seq + self.drop_tokens) * dim, dst: r * max * dim, elems: kept * dim });
            mask.slice_mut(ndarray::s![r, ..kept]).fill(1);
        }
        ([self.batch, max, dim], copies, mask)
    }

    /// The reference's post-processing of the encoder output `hidden` [batch, seq, dim]: per row the
    /// valid hidden states without the first `drop_tokens`, zero-padded to `seq - drop_tokens` (the
    /// longest row, or its bucket), and the matching mask (1 = token).
    pub fn prompt_embeds(&self, hidden: ArrayView3<f32>) -> Result<(Array3<f32>, Array2<i64>), PromptError> {
        let (b, s, d) = hidden.dim();
        if b != self.batch || s != self.seq {
            return Err(PromptError::Internal(format!(
                "text encoder returned hidden states [{b}, {s}, {d}] for a [{}, {}] batch",
                self.batch, self.seq
            )));
        }
        let max = self.seq - self.drop_tokens;
        let mut embeds = Array3::<f32>::zeros((b, max, d));
        let mut mask = Array2::<i64>::zeros((b, max));
        for (r, &len) in self.lengths.iter().enumerate() {
            let src = hidden.slice(ndarray::s![r, self.drop_tokens..len, ..]);
            embeds.slice_mut(ndarray::s![r, ..len - self.drop_tokens, ..]).assign(&src);
            mask.slice_mut(ndarray::s![r, ..len - self.drop_tokens]).fill(1);
        }
        Ok((embeds, mask))
    }
}

/// Tokenizer + template of one bundle: turns prompt rows into the text encoder's text inputs.
#[derive(Clone)]
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    settings: Prompt,
    merge_size: usize,
    image_token_id: u32,
    video_token_id: u32,
    pad_token_id: u32,
}

impl PromptEncoder {
    /// Loads `tokenizer.json` from `path`.
    pub fn from_file(path: &Path, settings: Prompt, vision: &Vision) -> Result<Self, PromptError> {
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(PromptError::TokenizerMissing { path: shown });
        }
        let bytes = std::fs::read(path).map_err(|e| PromptError::TokenizerLoad { path: shown.clone(), reason: e.to_string() })?;
        Self::from_bytes(&bytes, settings, vision).map_err(|e| match e {
            PromptError::TokenizerLoad { reason, .. } => PromptError::TokenizerLoad { path: shown, reason },
            e => e,
        })
    }

    /// Parses a `tokenizer.json` held in memory.
    pub fn from_bytes(json: &[u8], settings: Prompt, vision: &Vision) -> Result<Self, PromptError> {
        let tokenizer = Tokenizer::from_bytes(json)
            .map_err(|e| PromptError::TokenizerLoad { path: "<memory>".into(), reason: e.to_string() })?;
        Self::new(tokenizer, settings, vision)
    }

    /// Wraps a loaded tokenizer; checks it and the templates against the vision settings.
    pub fn new(tokenizer: Tokenizer, settings: Prompt, vision: &Vision) -> Result<Self, PromptError> {
        vision.validate().map_err(|e| PromptError::Template(e.to_string()))?;
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| PromptError::TokenizerMismatch(format!("it has no `{token}` token")))
        };
        let image_token_id = id(IMAGE_TOKEN)?;
        let video_token_id = id(VIDEO_TOKEN)?;
        let pad_token_id = id(PAD_TOKEN)?;
        if image_token_id != vision.image_token_id || video_token_id != vision.video_token_id {
            return Err(PromptError::TokenizerMismatch(format!(
                "`{IMAGE_TOKEN}` / `{VIDEO_TOKEN}` are ids {image_token_id} / {video_token_id} but the manifest \
                 says {} / {}",
                vision.image_token_id, vision.video_token_id
            )));
        }
        let (_, fields) = format_one(&settings.template, "").map_err(PromptError::Template)?;
        if fields == 0 {
            return Err(PromptError::Template("`template` has no `{}` where the user text goes".into()));
        }
        if let Some(t) = &settings.image_template {
            format_one(t, "1").map_err(|e| PromptError::Template(format!("image_template: {e}")))?;
        }
        let encoder =
            PromptEncoder { tokenizer, settings, merge_size: vision.merge_size, image_token_id, video_token_id, pad_token_id };
        // The special tokens must be recognised as such, or the expansion would not survive.
        let ids = encoder.tokenize(&format!("a{IMAGE_TOKEN}{IMAGE_TOKEN}b"))?;
        if ids.iter().filter(|&&i| i == image_token_id).count() != 2 {
            return Err(PromptError::TokenizerMismatch(format!("`{IMAGE_TOKEN}` is not an added (special) token")));
        }
        Ok(encoder)
    }

    pub fn settings(&self) -> &Prompt {
        &self.settings
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` as the processor's tokenizer call gives them: added tokens recognised,
    /// NFC + byte-level BPE elsewhere, the tokenizer's own post-processor (none adds BOS/EOS for Qwen2).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| PromptError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text the reference pipeline gives its processor for one prompt with `num_images` images
    /// (before placeholder expansion). Fails if the user text holds an image/video placeholder.
    pub fn render(&self, row: usize, user_text: &str, num_images: usize) -> Result<String, PromptError> {
        for token in [IMAGE_TOKEN, VIDEO_TOKEN] {
            if user_text.contains(token) {
                return Err(PromptError::ReservedToken { row, token });
            }
        }
        let mut prefix = String::new();
        if let Some(t) = &self.settings.image_template {
            for i in 0..num_images {
                prefix.push_str(&format_one(t, &(i + 1).to_string()).map_err(PromptError::Template)?.0);
            }
        }
        prefix.push_str(user_text);
        let (text, _) = format_one(&self.settings.template, &prefix).map_err(PromptError::Template)?;
        if text.contains(VIDEO_TOKEN) {
            return Err(PromptError::Template(format!("the template holds `{VIDEO_TOKEN}`")));
        }
        let placeholders = text.matches(IMAGE_TOKEN).count();
        if placeholders != num_images {
            return Err(PromptError::ImageCount { row, images: num_images, placeholders });
        }
        Ok(text)
    }

    /// Encodes a batch: `rows[r].images` index `grids` (the batch's image slots, in `VisionBatch`
    /// order). Rows are right-padded to the longest.
    pub fn encode(&self, rows: &[PromptRow<'_>], grids: &[ImageGrid]) -> Result<TextBatch, PromptError> {
        self.encode_bucketed(rows, grids, 1)
    }

    /// [`PromptEncoder::encode`] with the kept part of the padded length (`seq - drop_tokens`) rounded
    /// up to a multiple of `bucket` (at most `max_text_tokens`), so that batches of different prompts
    /// share shapes.
    pub fn encode_bucketed(&self, rows: &[PromptRow<'_>], grids: &[ImageGrid], bucket: usize) -> Result<TextBatch, PromptError> {
        let ids = rows.iter().enumerate().map(|(r, row)| self.tokenize_row(r, *row, grids)).collect::<Result<Vec<_>, _>>()?;
        self.assemble(rows, &ids, grids, bucket)
    }

    /// Row `r` on its own: the template rendered, each placeholder expanded to its image's token
    /// count, tokenized and checked against `max_text_tokens`. The ids depend only on the row's text
    /// and its images' grids, never on the rest of a batch, so a job tokenizes once (when it is
    /// prepared) and its batch only assembles the rows ([`PromptEncoder::assemble`]).
    pub fn tokenize_row(&self, r: usize, row: PromptRow<'_>, grids: &[ImageGrid]) -> Result<Vec<u32>, PromptError> {
        let m2 = self.merge_size * self.merge_size;
        let drop = self.settings.drop_tokens;
        for &slot in row.images {
            if slot >= grids.len() {
                return Err(PromptError::BadSlot { row: r, slot, slots: grids.len() });
            }
        }
        let text = self.render(r, row.text, row.images.len())?;
        // The processor's expansion: the i-th placeholder becomes the i-th image's token count.
        let mut expanded = String::with_capacity(text.len());
        let mut pieces = text.split(IMAGE_TOKEN);
        expanded.push_str(pieces.next().unwrap_or(""));
        for (piece, &slot) in pieces.zip(row.images) {
            let g = grids[slot];
            if g.patches() % m2 != 0 {
                return Err(PromptError::Internal(format!("image grid {g:?} is not a multiple of {m2}")));
            }
            expanded.push_str(&IMAGE_TOKEN.repeat(g.merged_tokens(self.merge_size)));
            expanded.push_str(piece);
        }
        let ids = self.tokenize(&expanded)?;
        let want: usize = row.images.iter().map(|&s| grids[s].merged_tokens(self.merge_size)).sum();
        let got = ids.iter().filter(|&&i| i == self.image_token_id).count();
        if got != want {
            return Err(PromptError::Internal(format!("prompt {r}: {got} image tokens after tokenization, {want} expected")));
        }
        if ids.len() <= drop {
            return Err(PromptError::Template(format!(
                "a prompt is only {} tokens, not more than drop_tokens = {drop}",
                ids.len()
            )));
        }
        if ids.len() - drop > self.settings.max_text_tokens {
            return Err(PromptError::TooLong { row: r, tokens: ids.len() - drop, max: self.settings.max_text_tokens });
        }
        Ok(ids)
    }

    /// The batch of `rows` from their token ids (`ids[r]` = [`PromptEncoder::tokenize_row`] of row
    /// `r` with the same grids): right-padded to the longest row, rounded up to `bucket` as in
    /// [`PromptEncoder::encode_bucketed`], with mRoPE positions and vision-token indices.
    pub fn assemble(
        &self,
        rows: &[PromptRow<'_>],
        ids: &[impl AsRef<[u32]>],
        grids: &[ImageGrid],
        bucket: usize,
    ) -> Result<TextBatch, PromptError> {
        if rows.is_empty() {
            return Err(PromptError::EmptyBatch);
        }
        if ids.len() != rows.len() {
            return Err(PromptError::Internal(format!("{} token rows for {} prompt rows", ids.len(), rows.len())));
        }
        let mut offsets = Vec::with_capacity(grids.len());
        let mut next = 0usize;
        for g in grids {
            offsets.push(next);
            next += g.merged_tokens(self.merge_size);
        }
        let drop = self.settings.drop_tokens;
        let batch = rows.len();
        let seq = drop + self.kept_len(ids, bucket)?;
        let n = batch * seq;
        let mut out = TextBatch {
            batch,
            seq,
            input_ids: vec![self.pad_token_id as i64; n],
            attention_mask: vec![0; n],
            mm_token_type_ids: vec![0; n],
            position_ids: vec![0; 3 * n],
            image_embed_index: vec![-1; n],
            lengths: ids.iter().map(|r| r.as_ref().len()).collect(),
            drop_tokens: drop,
        };
        for (r, ids) in ids.iter().enumerate() {
            let base = r * seq;
            for (i, &id) in ids.as_ref().iter().enumerate() {
                out.input_ids[base + i] = id as i64;
                out.attention_mask[base + i] = 1;
                out.mm_token_type_ids[base + i] = if id == self.image_token_id {
                    1
                } else if id == self.video_token_id {
                    2
                } else {
                    0
                };
            }
            self.positions(r, &mut out, rows[r].images, grids, &offsets)?;
        }
        Ok(out)
    }

    /// The text length the transformer sees for rows of these token ids: the longest row after the
    /// system prompt is dropped, rounded up to a multiple of `bucket`, never past `max_text_tokens`
    /// (the engines' text profile), even when it is not a multiple.
    pub fn kept_len(&self, ids: &[impl AsRef<[u32]>], bucket: usize) -> Result<usize, PromptError> {
        let drop = self.settings.drop_tokens;
        let longest = ids.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
        if longest <= drop {
            return Err(PromptError::Internal(format!("the longest row has {longest} tokens, drop_tokens is {drop}")));
        }
        Ok(((longest - drop).div_ceil(bucket.max(1)) * bucket.max(1)).min(self.settings.max_text_tokens))
    }

    /// `get_rope_index` for row `r` (valid tokens only) and its `image_embed_index`.
    fn positions(
        &self,
        r: usize,
        out: &mut TextBatch,
        images: &[usize],
        grids: &[ImageGrid],
        offsets: &[usize],
    ) -> Result<(), PromptError> {
        let (seq, n, len) = (out.seq, out.batch * out.seq, out.lengths[r]);
        let base = r * seq;
        let types = &out.mm_token_type_ids[base..base + len];
        let mut slots = images.iter();
        let mut current = 0i64;
        let mut i = 0;
        while i < len {
            let kind = types[i];
            let end = i + types[i..].iter().take_while(|&&t| t == kind).count();
            if kind == 0 {
                for j in i..end {
                    let p = current + (j - i) as i64;
                    for axis in 0..3 {
                        out.position_ids[axis * n + base + j] = p;
                    }
                }
                current += (end - i) as i64;
            } else {
                // Videos never reach here: `render` refuses `<|video_pad|>`.
                let Some(&slot) = slots.next() else {
                    return Err(PromptError::Internal(format!("prompt {r}: more image runs than images")));
                };
                let g = grids[slot];
                let m = self.merge_size;
                let (lt, lh, lw) = (g.t, g.h / m, g.w / m);
                if lt * lh * lw != end - i {
                    return Err(PromptError::Internal(format!(
                        "prompt {r}: an image run of {} tokens for a grid of {} tokens",
                        end - i,
                        lt * lh * lw
                    )));
                }
                let mut j = base + i;
                for t in 0..lt {
                    for y in 0..lh {
                        for x in 0..lw {
                            out.position_ids[j] = t as i64 + current;
                            out.position_ids[n + j] = y as i64 + current;
                            out.position_ids[2 * n + j] = x as i64 + current;
                            out.image_embed_index[j] = (offsets[slot] + (j - base - i)) as i64;
                            j += 1;
                        }
                    }
                }
                current += (lh.max(lw)) as i64;
            }
            i = end;
        }
        Ok(())
    }
}

/// The text encoder's named inputs (the `text_encoder` contract of engines/README.md). Takes the
/// vision batch by value so its pixels move into the tensor; `text` stays for [`TextBatch::prompt_embeds`].
pub fn text_encoder_inputs(text: &TextBatch, mut vision: VisionBatch) -> Result<Vec<(&'static str, Tensor)>, PromptError> {
    let patches = vision.patches();
    if vision.pixel_values.len() != patches * vision.patch_dim {
        return Err(PromptError::Internal(format!(
            "pixel_values holds {} values for {patches} patches of {}",
            vision.pixel_values.len(),
            vision.patch_dim
        )));
    }
    let (pixels, dim) = (std::mem::take(&mut vision.pixel_values), vision.patch_dim);
    let mut inputs = text_encoder_index_inputs(text, vision)?;
    inputs.insert(3, ("pixel_values", Tensor::f32(&[patches, dim], pixels)));
    Ok(inputs)
}

/// [`text_encoder_inputs`] without `pixel_values` (which the caller gives as staged rows, already in the
/// engine's dtype): the token, position and vision index tensors.
pub fn text_encoder_index_inputs(text: &TextBatch, vision: VisionBatch) -> Result<Vec<(&'static str, Tensor)>, PromptError> {
    let units = vision.units() as i64;
    if let Some(&bad) = text.image_embed_index.iter().find(|&&i| i >= units) {
        return Err(PromptError::Internal(format!("a placeholder takes vision token {bad} but the images give {units}")));
    }
    let patches = vision.patches();
    let (b, s) = (text.batch, text.seq);
    Ok(vec![
        ("input_ids", Tensor::i64(&[b, s], text.input_ids.clone())),
        ("attention_mask", Tensor::i64(&[b, s], text.attention_mask.clone())),
        ("position_ids", Tensor::i64(&[3, b, s], text.position_ids.clone())),
        ("vision_pos_ids", Tensor::i64(&[patches, 2], vision.vision_pos_ids)),
        ("window_index", Tensor::i64(&[vision.window_index.len()], vision.window_index)),
        ("window_seg", Tensor::i64(&[patches], vision.window_seg)),
        ("image_seg", Tensor::i64(&[patches], vision.image_seg)),
        ("image_embed_index", Tensor::i64(&[b, s], text.image_embed_index.clone())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    const SPECIALS: [&str; 7] =
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"];
    const PAD: i64 = 256;
    const IMG: i64 = 261;

    /// One token per UTF-8 byte (byte-level BPE without merges) plus Qwen's special tokens at 256...
    fn tokenizer_json() -> Vec<u8> {
        let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        chars.sort();
        let vocab: serde_json::Map<String, serde_json::Value> =
            chars.iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
        let added: Vec<_> = SPECIALS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        serde_json::to_vec(&json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        }))
        .unwrap()
    }

    fn vision() -> Vision {
        Vision { image_token_id: 261, video_token_id: 262, ..Vision::qwen_image_edit() }
    }

    fn v1(max: usize) -> Prompt {
        Prompt {
            template: "ab<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>".into(),
            image_template: None,
            drop_tokens: 2,
            max_text_tokens: max,
        }
    }

    fn plus() -> Prompt {
        Prompt {
            template: "ab{}<|im_end|>".into(),
            image_template: Some("P{}:<|vision_start|><|image_pad|><|vision_end|>".into()),
            drop_tokens: 2,
            max_text_tokens: 100,
        }
    }

    fn encoder(s: Prompt) -> PromptEncoder {
        PromptEncoder::from_bytes(&tokenizer_json(), s, &vision()).unwrap()
    }

    #[test]
    fn format_one_follows_python_str_format() {
        assert_eq!(format_one("a{}b", "X").unwrap(), ("aXb".to_string(), 1));
        assert_eq!(format_one("{{a}}{0}{0}", "X").unwrap(), ("{a}XX".to_string(), 2));
        assert_eq!(format_one("no field", "X").unwrap(), ("no field".to_string(), 0));
        // The argument is inserted literally, braces and all.
        assert_eq!(format_one("[{}]", "{}{0}}").unwrap().0, "[{}{0}}]");
        assert!(format_one("{}{}", "X").unwrap_err().contains("more than one"));
        assert!(format_one("{x}", "X").unwrap_err().contains("unsupported field"));
        assert!(format_one("a}b", "X").unwrap_err().contains("single `}`"));
        assert!(format_one("a{", "X").unwrap_err().contains("unclosed"));
        assert!(format_one("{}{0}", "X").unwrap_err().contains("mix"));
    }

    #[test]
    fn builtin_templates_render_like_the_reference() {
        let e = Prompt::qwen_image_edit(512);
        let (t, _) = format_one(&e.template, "hi").unwrap();
        assert!(t.starts_with("<|im_start|>system\nDescribe the key features of the input image (color, shape,"));
        assert!(t.ends_with("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"));
        let p = Prompt::qwen_image_edit_plus(512);
        assert!(format_one(&p.template, "X").unwrap().0.ends_with("user\nX<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn render_places_images_and_refuses_placeholders_in_user_text() {
        let e = encoder(plus());
        assert_eq!(
            e.render(0, "go", 2).unwrap(),
            "abP1:<|vision_start|><|image_pad|><|vision_end|>P2:<|vision_start|><|image_pad|><|vision_end|>go<|im_end|>"
        );
        let e1 = encoder(v1(100));
        assert!(matches!(e1.render(3, "x<|image_pad|>", 1), Err(PromptError::ReservedToken { row: 3, .. })));
        assert!(matches!(e1.render(0, "<|video_pad|>", 1), Err(PromptError::ReservedToken { .. })));
        assert!(matches!(e1.render(0, "x", 2), Err(PromptError::ImageCount { images: 2, placeholders: 1, .. })));
        // Other special tokens in user text are tokenized as specials, like the reference does.
        assert!(e1.render(0, "<|im_end|>", 1).is_ok());
    }

    #[test]
    fn encode_expands_pads_and_positions_like_get_rope_index() {
        let e = encoder(v1(100));
        let grids = [ImageGrid { t: 1, h: 4, w: 6 }, ImageGrid { t: 1, h: 2, w: 2 }];
        let rows = [PromptRow { text: "xyz", images: &[0] }, PromptRow { text: "", images: &[1] }];
        let b = e.encode(&rows, &grids).unwrap();
        // Row 0: a b <vs> 6 pads <ve> x y z <im_end> = 14; row 1: a b <vs> 1 pad <ve> <im_end> = 6.
        assert_eq!((b.batch, b.seq, b.lengths.clone()), (2, 14, vec![14, 6]));
        assert_eq!(b.kept_lengths(), vec![12, 4]);
        let (a, bb, vs, ve, end) = (b'a' as i64 - 33, b'b' as i64 - 33, 259, 260, 258);
        let row0: Vec<i64> = b.input_ids[..14].to_vec();
        assert_eq!(row0[..3], [a, bb, vs]);
        assert_eq!(row0[3..9], [IMG; 6]);
        assert_eq!((row0[9], row0[13]), (ve, end));
        assert_eq!(b.input_ids[14..20], [a, bb, vs, IMG, ve, end]);
        assert_eq!(b.input_ids[20..], [PAD; 8]);
        assert_eq!(b.attention_mask[14..], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.mm_token_type_ids[..10], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]);
        let n = 28;
        let (t, h, w) = (&b.position_ids[..n], &b.position_ids[n..2 * n], &b.position_ids[2 * n..]);
        // Image of llm grid 2x3 starting at 3: t = 3, h = 3 + row, w = 3 + col; text resumes at 3 + 3.
        assert_eq!(t[..14], [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9, 10]);
        assert_eq!(h[..14], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9, 10]);
        assert_eq!(w[..14], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(w[14..], [0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.image_embed_index[..10], [-1, -1, -1, 0, 1, 2, 3, 4, 5, -1]);
        assert_eq!(b.image_embed_index[14..20], [-1, -1, -1, 6, -1, -1]);
    }

    #[test]
    fn buckets_round_the_kept_length_up_but_never_past_the_limit() {
        let grids = [ImageGrid { t: 1, h: 2, w: 2 }];
        let row = |text| [PromptRow { text, images: &[0] }];
        // kept = text + 4 (vs, 1 pad, ve, im_end); drop = 2.
        let e = encoder(v1(100));
        let b = e.encode_bucketed(&row("x"), &grids, 8).unwrap();
        assert_eq!((b.seq, b.lengths.clone(), b.kept_lengths()), (2 + 8, vec![7], vec![5]));
        assert_eq!(b.attention_mask, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(e.encode_bucketed(&row("12345678"), &grids, 8).unwrap().seq, 2 + 16);
        assert_eq!(e.encode_bucketed(&row("1234"), &grids, 8).unwrap().seq, 2 + 8);
        // Same bucket, same shapes: a job's tensors do not depend on its neighbours.
        let one = e.encode_bucketed(&row("abc"), &grids, 8).unwrap();
        let two = e.encode_bucketed(&[row("abc")[0], row("a")[0]], &grids, 8).unwrap();
        assert_eq!(two.seq, one.seq);
        assert_eq!(two.input_ids[..one.seq], one.input_ids[..]);
        // A limit that is not a multiple of the bucket caps the padding.
        let e = encoder(v1(10));
        assert_eq!(e.encode_bucketed(&row("12345"), &grids, 8).unwrap().seq, 2 + 10);
        // prompt_embeds pads to the bucket.
        let hidden = Array3::<f32>::ones((1, 10, 3));
        let (embeds, mask) = e.encode_bucketed(&row("12"), &grids, 8).unwrap().prompt_embeds(hidden.view()).unwrap();
        assert_eq!((embeds.dim(), mask.row(0).sum()), ((1, 8, 3), 6));
    }

    #[test]
    fn rows_sharing_an_image_point_at_the_same_vision_tokens() {
        let e = encoder(v1(100));
        let grids = [ImageGrid { t: 1, h: 2, w: 4 }];
        let rows = [PromptRow { text: "cond", images: &[0] }, PromptRow { text: "", images: &[0] }];
        let b = e.encode(&rows, &grids).unwrap();
        let picks = |r: usize| -> Vec<i64> {
            b.image_embed_index[r * b.seq..(r + 1) * b.seq].iter().copied().filter(|&i| i >= 0).collect()
        };
        assert_eq!(picks(0), vec![0, 1]);
        assert_eq!(picks(1), vec![0, 1]);
    }

    #[test]
    fn encode_refuses_long_prompts_and_bad_slots() {
        let e = encoder(v1(10));
        let grids = [ImageGrid { t: 1, h: 2, w: 2 }];
        // kept = vs + 1 pad + ve + text + im_end = text + 4.
        assert!(e.encode(&[PromptRow { text: "123456", images: &[0] }], &grids).is_ok());
        let err = e.encode(&[PromptRow { text: "1234567", images: &[0] }], &grids).unwrap_err();
        assert!(matches!(err, PromptError::TooLong { row: 0, tokens: 11, max: 10 }), "{err}");
        assert!(err.is_bad_input());
        let err = e.encode(&[PromptRow { text: "x", images: &[1] }], &grids).unwrap_err();
        assert!(matches!(err, PromptError::BadSlot { slot: 1, slots: 1, .. }));
        assert!(matches!(e.encode(&[], &grids), Err(PromptError::EmptyBatch)));
    }

    #[test]
    fn plus_rows_take_their_images_in_order() {
        let e = encoder(plus());
        let grids = [ImageGrid { t: 1, h: 2, w: 2 }, ImageGrid { t: 1, h: 2, w: 4 }];
        let b = e.encode(&[PromptRow { text: "q", images: &[1, 0] }], &grids).unwrap();
        let picks: Vec<i64> = b.image_embed_index.iter().copied().filter(|&i| i >= 0).collect();
        assert_eq!(picks, vec![1, 2, 0]);
    }

    #[test]
    fn construction_checks_tokenizer_and_templates() {
        let bad = Prompt { template: "no field".into(), ..v1(10) };
        assert!(matches!(PromptEncoder::from_bytes(&tokenizer_json(), bad, &vision()), Err(PromptError::Template(_))));
        let wrong_ids = Vision::qwen_image_edit();
        let r = PromptEncoder::from_bytes(&tokenizer_json(), v1(10), &wrong_ids);
        assert!(matches!(r, Err(PromptError::TokenizerMismatch(_))));
        let r = PromptEncoder::from_bytes(b"{not json", v1(10), &vision());
        assert!(matches!(r, Err(PromptError::TokenizerLoad { .. })));
        let r = PromptEncoder::from_file(Path::new("/nonexistent/tokenizer.json"), v1(10), &vision());
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("not found") && msg.contains("/nonexistent/tokenizer.json"), "{msg}");
    }

    #[test]
    fn prompt_embeds_drop_the_system_prompt_and_repad() {
        let e = encoder(v1(100));
        let grids = [ImageGrid { t: 1, h: 2, w: 2 }];
        let rows = [PromptRow { text: "abc", images: &[0] }, PromptRow { text: "", images: &[0] }];
        let b = e.encode(&rows, &grids).unwrap();
        let hidden = ndarray::Array3::from_shape_fn((2, b.seq, 2), |(r, s, d)| (r * 100 + s * 2 + d) as f32);
        let (emb, mask) = b.prompt_embeds(hidden.view()).unwrap();
        assert_eq!(emb.dim(), (2, 7, 2));
        assert_eq!(emb[[0, 0, 1]], 5.0); // row 0, token 2, dim 1
        assert_eq!(emb[[1, 3, 0]], 110.0);
        assert_eq!(emb[[1, 4, 0]], 0.0);
        assert_eq!(mask.row(1).to_vec(), vec![1, 1, 1, 1, 0, 0, 0]);
        let bad = ndarray::Array3::<f32>::zeros((1, b.seq, 2));
        assert!(b.prompt_embeds(bad.view()).is_err());
    }

    #[test]
    fn encoder_inputs_follow_the_contract() {
        let s = vision();
        let e = encoder(v1(100));
        let img = super::super::vision::patchify(&vec![1u8; 56 * 56 * 3], 56, 56, &s).unwrap();
        let vb = VisionBatch::new(&[&img], &s).unwrap();
        let b = e.encode(&[PromptRow { text: "x", images: &[0] }], &vb.grids).unwrap();
        let inputs = text_encoder_inputs(&b, vb).unwrap();
        let shapes: Vec<(&str, Vec<usize>)> = inputs.iter().map(|(n, t)| (*n, t.shape().to_vec())).collect();
        let seq = b.seq;
        assert_eq!(
            shapes,
            vec![
                ("input_ids", vec![1, seq]),
                ("attention_mask", vec![1, seq]),
                ("position_ids", vec![3, 1, seq]),
                ("pixel_values", vec![16, 1176]),
                ("vision_pos_ids", vec![16, 2]),
                ("window_index", vec![4]),
                ("window_seg", vec![16]),
                ("image_seg", vec![16]),
                ("image_embed_index", vec![1, seq]),
            ]
        );
        // A text batch pointing past the images is refused.
        let vb2 = VisionBatch::new(&[&img], &s).unwrap();
        let big = [ImageGrid { t: 1, h: 4, w: 8 }];
        let b2 = e.encode(&[PromptRow { text: "x", images: &[0] }], &big).unwrap();
        assert!(text_encoder_inputs(&b2, vb2).is_err());
    }
}
