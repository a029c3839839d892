//! An edit job as the pipeline sees it: the request (images decoded), the key of the batches it may
//! join, its output, and the errors of preparing or running it.

use image::RgbImage;
use ndarray::Array3;

use super::prompt::PromptError;
use crate::runtime;

/// One edit as given by a client (images already decoded, EXIF orientation applied).
#[derive(Clone, Debug)]
pub struct EditRequest {
    /// Input images: exactly one for Qwen-Image-Edit, one or more for Edit Plus.
    pub images: Vec<RgbImage>,
    pub prompt: String,
    /// True CFG runs only when this is given and `true_cfg_scale > 1` (as the reference).
    pub negative_prompt: Option<String>,
    pub num_inference_steps: u32,
    pub true_cfg_scale: f32,
    pub seed: u64,
    /// Output size; `None` = the reference's size from the (last) input image.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Lightning schedule (constant shift 3) instead of the base one.
    pub lightning: bool,
    /// Initial packed noise [1, seq, 64] instead of the seed's (reproduction against other implementations).
    pub noise: Option<Array3<f32>>,
}

/// What must be equal for jobs to share one batch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub width: u32,
    pub height: u32,
    /// VAE sizes of the condition images, in order.
    pub condition_sizes: Vec<(u32, u32)>,
    pub steps: u32,
    pub true_cfg: bool,
    pub lightning: bool,
    /// Text length the transformer sees (rows' longest, rounded up to the text bucket): jobs batch
    /// only with jobs of the same bucket, so a job's tensors have the same shapes alone and batched.
    pub text_len: usize,
}

/// A finished edit.
#[derive(Clone, Debug)]
pub struct EditOutput {
    pub image: RgbImage,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub steps: u32,
    pub true_cfg: bool,
    pub lightning: bool,
}

/// Errors of preparing or running an edit.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The request cannot be run as given (client error: HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// The prompt is longer than the bundle accepts (client error: HTTP 422).
    #[error("prompt too long: {tokens} tokens, at most {max} are accepted")]
    PromptTooLong { tokens: usize, max: usize },
    /// An engine failed while running the batch (server error: HTTP 500).
    #[error(transparent)]
    Engine(runtime::Error),
    /// The batch was stopped at a checkpoint because nobody waits for its results any more.
    #[error("the batch was stopped: nobody waits for its results")]
    Cancelled,
    /// Anything else that went wrong inside the pipeline (server error: HTTP 500).
    #[error("internal pipeline error: {0}")]
    Internal(String),
}

impl EditError {
    /// A copy for each job of a failed batch (engine errors keep their message).
    pub fn replicate(&self) -> EditError {
        match self {
            EditError::Invalid(m) => EditError::Invalid(m.clone()),
            EditError::PromptTooLong { tokens, max } => EditError::PromptTooLong { tokens: *tokens, max: *max },
            EditError::Engine(e) => EditError::Engine(runtime::Error::Run { component: "batch".into(), reason: e.to_string() }),
            EditError::Internal(m) => EditError::Internal(m.clone()),
            EditError::Cancelled => EditError::Cancelled,
        }
    }

    /// Whether the client caused it (4xx) rather than the server (5xx).
    pub fn is_client_error(&self) -> bool {
        matches!(self, EditError::Invalid(_) | EditError::PromptTooLong { .. })
    }
}

impl From<runtime::Error> for EditError {
    fn from(e: runtime::Error) -> EditError {
        match e {
            runtime::Error::Cancelled { .. } => EditError::Cancelled,
            e => EditError::Engine(e),
        }
    }
}

impl From<PromptError> for EditError {
    fn from(e: PromptError) -> EditError {
        match e {
            PromptError::TooLong { tokens, max, .. } => EditError::PromptTooLong { tokens, max },
            e if e.is_bad_input() => EditError::Invalid(e.to_string()),
            e => EditError::Internal(e.to_string()),
        }
    }
}

/// An internal error from anything displayable (a broken invariant inside the pipeline).
pub(crate) fn internal(e: impl std::fmt::Display) -> EditError {
    EditError::Internal(e.to_string())
}

/// A client error from anything displayable (the request cannot be run as given).
pub(crate) fn invalid(e: impl std::fmt::Display) -> EditError {
    EditError::Invalid(e.to_string())
}
