//! The memory plan of a loaded model: `MEMORY_LIMIT` split into the loaded model (its resident
//! memory after the load), the in-flight budget (`REQUEST_MEMORY`: requests being read, decoded,
//! prepared, queued or encoded) and what is left for one running batch; the batcher's [`Sizing`]
//! from the pipeline's measured [`MemoryModel`]; what /health and the start-up log say fits.
//!
//! The two budgets never compete: requests can hold at most `REQUEST_MEMORY` whatever the batches
//! do, and a batch at most the batch budget whatever the requests do, so the process stays under
//! `MEMORY_LIMIT` (up to the model's accuracy, see `pipeline::memory`) and a batch never waits for
//! memory that queued requests hold.

use serde::Serialize;

use crate::batcher::Sizing;
use crate::pipeline::memory::{MemoryModel, StageSizes};
use crate::pipeline::{BatchKey, Preprocessor, DEFAULT_TEXT_BUCKET};
use crate::sysmem::human;

/// How `MEMORY_LIMIT` is shared (bytes).
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPlan {
    pub limit: u64,
    /// Resident memory of the loaded model (and the runtime around it).
    pub model: u64,
    /// The in-flight budget (`REQUEST_MEMORY`).
    pub requests: u64,
    /// What one running batch may need: `limit - model - requests`.
    pub batch: u64,
    #[serde(skip)]
    pub batch_size: usize,
    /// `None`: the peak could not be measured here; batches are capped by `BATCH_SIZE` only.
    #[serde(skip)]
    pub estimator: Option<MemoryModel>,
}

/// What fits at one output size (for /health and the start-up log).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ResolutionFit {
    pub width: u32,
    pub height: u32,
    /// One job's batch memory (a prompt of up to one text bucket, no true CFG).
    pub job_bytes: u64,
    /// The largest batch that fits (0: not even one job), up to `BATCH_SIZE`.
    pub max_batch: usize,
    /// The same with true CFG (twice the transformer's rows).
    pub max_batch_true_cfg: usize,
}

impl MemoryPlan {
    /// The plan for `limit`, a model using `model` bytes and `requests` for requests in flight.
    pub fn new(limit: u64, model: u64, requests: u64, batch_size: usize, estimator: Option<MemoryModel>) -> MemoryPlan {
        MemoryPlan { limit, model, requests, batch: limit.saturating_sub(model).saturating_sub(requests), batch_size, estimator }
    }

    /// The batch memory of `n` jobs of `key` (`None` without a model).
    pub fn batch_bytes(&self, key: &BatchKey, n: usize) -> Option<u64> {
        self.estimator.as_ref().map(|m| m.batch_bytes(key, n))
    }

    /// Whether `n` jobs of `key` fit the batch budget (always, without a model).
    pub fn fits_batch(&self, key: &BatchKey, n: usize) -> bool {
        self.batch_bytes(key, n).is_none_or(|b| b <= self.batch)
    }

    /// The largest batch of `key` that fits, up to `BATCH_SIZE`.
    pub fn max_batch(&self, key: &BatchKey) -> usize {
        match &self.estimator {
            Some(m) => m.max_batch(key, self.batch, self.batch_size),
            None => self.batch_size,
        }
    }

    /// What fits at each of `sizes` (outputs of the bundle's profiles, or its default area).
    pub fn resolutions(&self, pre: &Preprocessor, sizes: &[(u32, u32)], lightning: bool) -> Vec<ResolutionFit> {
        let steps = pre.info().default_steps;
        sizes
            .iter()
            .filter_map(|&(w, h)| {
                let mut key = pre.provisional_key(&[(w, h)], (Some(w), Some(h)), steps, false, lightning).ok()?;
                key.text_len = DEFAULT_TEXT_BUCKET.min(key.text_len);
                let cfg = BatchKey { true_cfg: true, ..key.clone() };
                Some(ResolutionFit {
                    width: key.width,
                    height: key.height,
                    job_bytes: self.batch_bytes(&key, 1).unwrap_or(0),
                    max_batch: self.max_batch(&key),
                    max_batch_true_cfg: self.max_batch(&cfg),
                })
            })
            .collect()
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        format!(
            "MEMORY_LIMIT {}: model {}, requests in flight {} (REQUEST_MEMORY), one batch {}",
            human(self.limit),
            human(self.model),
            human(self.requests),
            human(self.batch)
        )
    }
}

impl Sizing<BatchKey> for MemoryPlan {
    fn fits(&self, key: &BatchKey, n: usize) -> bool {
        self.fits_batch(key, n)
    }

    /// Transformer rows x (steps + the encoders and the decoder, about two steps) x tokens.
    fn work(&self, key: &BatchKey, n: usize) -> f64 {
        let rows = (n * if key.true_cfg { 2 } else { 1 }) as f64;
        rows * (f64::from(key.steps) + 2.0) * StageSizes::of(key).sequence.max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::memory::Curve;

    fn model() -> MemoryModel {
        let flat = |y: f64| Curve::new((1.0, y), (1e7, y));
        MemoryModel {
            text: flat(1e6),
            vae_encode: flat(1e8),
            denoise: flat(5e8),
            decode: Curve::new((16384.0, 1e8), (1048576.0, 2e9)),
            loaded_rss: 0,
            probe_seconds: 0.0,
        }
    }

    fn key(side: u32, cfg: bool) -> BatchKey {
        BatchKey {
            width: side,
            height: side,
            condition_sizes: vec![(1024, 1024)],
            steps: 4,
            true_cfg: cfg,
            lightning: false,
            text_len: 64,
        }
    }

    #[test]
    fn the_budgets_add_up_to_the_limit_and_cap_batches() {
        let plan = MemoryPlan::new(10_000_000_000, 1_000_000_000, 2_000_000_000, 4, Some(model()));
        assert_eq!(plan.batch, 7_000_000_000);
        assert_eq!(plan.limit, plan.model + plan.requests + plan.batch);
        assert_eq!(plan.max_batch(&key(1024, false)), 3, "3 x 2 GB fit in 7 GB, 4 do not");
        assert!(plan.fits_batch(&key(1024, false), 3) && !plan.fits_batch(&key(1024, false), 4));
        assert_eq!(plan.max_batch(&key(128, false)), 4, "capped by BATCH_SIZE");
        // True CFG doubles the transformer's rows: 0.5 GB x 2 per job here, still under the decoder.
        assert_eq!(plan.max_batch(&key(1024, true)), 3);
        // A limit below the model leaves nothing, without underflow.
        let tight = MemoryPlan::new(500, 1_000, 100, 4, Some(model()));
        assert_eq!((tight.batch, tight.max_batch(&key(128, false))), (0, 0));
        // Without a model every batch fits (BATCH_SIZE only).
        let blind = MemoryPlan::new(1, 1, 1, 4, None);
        assert!(blind.fits_batch(&key(4096, true), 4));
        assert_eq!(blind.max_batch(&key(4096, true)), 4);
    }

    #[test]
    fn work_grows_with_rows_steps_and_tokens() {
        let plan = MemoryPlan::new(1, 0, 0, 4, None);
        let w = |k: &BatchKey, n| plan.work(k, n);
        assert_eq!(w(&key(1024, false), 2), 2.0 * w(&key(1024, false), 1));
        assert_eq!(w(&key(1024, true), 1), 2.0 * w(&key(1024, false), 1));
        assert!(w(&key(1024, false), 1) > w(&key(512, false), 1));
        // Steps plus about two for the encoders and the decoder: (50 + 2) / (4 + 2).
        let ratio = w(&BatchKey { steps: 50, ..key(512, false) }, 1) / w(&key(512, false), 1);
        assert!((ratio - 52.0 / 6.0).abs() < 1e-9, "{ratio}");
    }
}
