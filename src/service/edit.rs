//! One edit through the service: `EditService::edit` (and `edit_fields`, n images of a form) and its
//! phases (see the module docs of `service` for the contract): parse, images' bytes, memory
//! admission, decode, prepare, queue, batch, encode. Every phase checks the request's cancellation
//! and holds its memory reservation.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use super::images::{Encoded, Loader};
use super::model::Job;
use super::schema::{self, EditParams, EditResponse, ImageSource, RawInput, Timings};
use super::work::{Cancel, Reservation};
use super::{Admission, ApiError, EditService, LoadedModel, MIN_REQUEST_BYTES};
use crate::imaging;
use crate::pipeline::{BatchKey, EditRequest};
use crate::sysmem::human;

/// A result's memory: the RGB image, its encoding, the base64 text and the JSON around it.
fn output_bytes(key: &BatchKey) -> u64 {
    14 * u64::from(key.width) * u64::from(key.height) + MIN_REQUEST_BYTES
}

impl EditService {
    /// One edit from its request body `{"input": {...}}` (keys beside `input`, like RunPod's `id`,
    /// are ignored), under its [`Admission`]. Fails with 504 `timeout` when `REQUEST_TIMEOUT` has
    /// passed since `started`. Dropping the future cancels the request (see the module docs).
    pub async fn edit(&self, admission: Admission, body: Bytes, started: Instant) -> Result<EditResponse, ApiError> {
        let mut one = self.timed(started, self.edit_untimed(admission, Input::Body(body), 1, started)).await?;
        one.pop().ok_or_else(|| ApiError::internal("no result"))
    }

    /// `n` edits of an input whose fields a front end parsed itself (a form), under its [`Admission`]:
    /// validated by the same rules as `edit`'s JSON ([`schema::validate`], fields named without
    /// `input.`), one result per image. The images use seeds `seed..seed+n-1` and take `n` queue
    /// places at once (503 when fewer are free); they run as one group, in one batch when
    /// `n <= BATCH_SIZE`, else in consecutive full batches. Timeout and cancellation as `edit`.
    pub async fn edit_fields(
        &self,
        admission: Admission,
        n: usize,
        input: RawInput,
        started: Instant,
    ) -> Result<Vec<EditResponse>, ApiError> {
        self.timed(started, self.edit_untimed(admission, Input::Fields(Box::new(input)), n.max(1), started)).await
    }

    /// Runs `work` within `REQUEST_TIMEOUT` from `started` (504 `timeout` after it; `work` is dropped).
    async fn timed<T>(
        &self,
        started: Instant,
        work: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let timeout = self.settings.request_timeout;
        match tokio::time::timeout_at((started + timeout).into(), work).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the request took longer than {:.0} s (REQUEST_TIMEOUT); retry later or with fewer steps",
                    timeout.as_secs_f64()
                ),
            )),
        }
    }

    async fn edit_untimed(
        &self,
        admission: Admission,
        input: Input,
        n: usize,
        started: Instant,
    ) -> Result<Vec<EditResponse>, ApiError> {
        let Admission { body_slot, memory } = admission;
        drop(body_slot); // the body is here: the slot is free for the next upload
        let cancel = Cancel::default();
        let _cancel_on_drop = cancel.on_drop();
        let model = self.loaded()?;
        let limits = model.limits.clone();
        let random = || u64::from(rand::random::<u32>());
        let params = match input {
            Input::Body(body) => {
                // The body and the strings parsed from it.
                memory.at_least(2 * body.len() as u64 + MIN_REQUEST_BYTES).map_err(|r| r.to_api("this request"))?;
                self.pool.run(&cancel, Some(&memory), move || schema::parse(&body, &limits, random)).await?
            }
            Input::Fields(input) => {
                self.pool
                    .run(&cancel, Some(&memory), move || schema::validate(*input, &limits, schema::Names::FORM, random))
                    .await?
            }
        };
        if n > self.settings.max_queue.saturating_sub(self.batcher.depth()) {
            return Err(self.no_room(n)); // before any image is fetched or decoded
        }
        if params.seed.checked_add(n as u64 - 1).is_none() {
            return Err(ApiError::validation(format!(
                "seed {} + {} does not fit in 64 bits; use a smaller seed",
                params.seed,
                n - 1
            )));
        }
        let loader = Loader {
            fetcher: &self.fetcher,
            limits: self.image_limits,
            paths: &self.paths,
            pool: &self.pool,
            cancel: &cancel,
            memory: &memory,
        };
        let (params, images) = self.load_images(model, params, n, &loader).await?;
        self.run(model, params, images, n, &cancel, &memory, started).await
    }

    /// The images of a request: their bytes and headers, the memory admission, then the pixels.
    async fn load_images(
        &self,
        model: &LoadedModel,
        mut params: EditParams,
        n: usize,
        loader: &Loader<'_>,
    ) -> Result<(EditParams, Vec<imaging::RgbImage>), ApiError> {
        let sources = std::mem::take(&mut params.images);
        let encoded_bytes: u64 = sources
            .iter()
            .map(|s| match s {
                ImageSource::Base64(b) => b.len() as u64 * 3 / 4,
                ImageSource::Bytes(b) => b.len() as u64,
                ImageSource::Url(_) | ImageSource::Path(_) => self.settings.url_max_bytes as u64,
            })
            .sum();
        let memory = loader.memory;
        memory.at_least(memory.bytes() + encoded_bytes).map_err(|r| r.to_api("this request's images"))?;
        let encoded = loader.encoded(sources).await?;
        self.admit_job(model, &params, &encoded, n, memory)?;
        let images = loader.decode(encoded).await?;
        Ok((params, images))
    }

    /// The memory admission, from the images' headers: the job's batch must fit the batch budget
    /// (413 `over_memory_limit` when it never can), its output `MAX_OUTPUT_PIXELS` (422), and its
    /// pixels, and the prepared tensors and result of each of its `n` jobs, REQUEST_MEMORY (503 while
    /// it is full).
    fn admit_job(
        &self,
        model: &LoadedModel,
        p: &EditParams,
        encoded: &[Encoded],
        n: usize,
        memory: &Reservation,
    ) -> Result<(), ApiError> {
        let dims: Vec<(u32, u32)> = encoded.iter().map(|e| (e.info.width, e.info.height)).collect();
        let cfg = p.true_cfg_scale > 1.0 && p.negative_prompt.is_some();
        let key = model
            .preprocessor
            .provisional_key(&dims, (p.width, p.height), p.num_inference_steps, cfg, self.settings.lightning)
            .map_err(ApiError::from)?;
        let pixels = u64::from(key.width) * u64::from(key.height);
        if pixels > self.settings.max_output_pixels {
            return Err(ApiError::validation(format!(
                "the output would be {}x{} = {pixels} pixels; at most {} are allowed (MAX_OUTPUT_PIXELS): ask for a smaller width/height",
                key.width, key.height, self.settings.max_output_pixels
            )));
        }
        if let Some(need) = model.plan.batch_bytes(&key, 1).filter(|&b| b > model.plan.batch) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "over_memory_limit",
                format!(
                    "this edit ({}x{} output from {} image(s){}) needs an estimated {} to run; MEMORY_LIMIT ({}) leaves {} for a batch: ask for a smaller width/height",
                    key.width,
                    key.height,
                    dims.len(),
                    if cfg { ", true CFG" } else { "" },
                    human(need),
                    human(model.plan.limit),
                    human(model.plan.batch)
                ),
            ));
        }
        let decode: u64 = encoded.iter().map(Encoded::decode_memory).sum();
        // The images are decoded and prepared once (`run`); each of the n jobs gets its own prepared
        // tensors (its staging rows and noise) and result, never its own copy of the decoded pixels.
        let per_job = model.preprocessor.prepared_bytes(&key) + output_bytes(&key);
        let extra = decode + n as u64 * per_job;
        memory.at_least(memory.bytes() + extra).map_err(|r| r.to_api("this request's images"))
    }

    /// Prepares the request once and one job per image from it (seeds `seed`, `seed + 1`, ...: only
    /// the noise differs), takes their queue places (all or none), runs them as one group and encodes
    /// the results, in order.
    #[allow(clippy::too_many_arguments)] // the request's pieces, each used once; a struct would only rename them
    async fn run(
        &self,
        model: &LoadedModel,
        params: EditParams,
        images: Vec<imaging::RgbImage>,
        n: usize,
        cancel: &Cancel,
        memory: &Reservation,
        started: Instant,
    ) -> Result<Vec<EditResponse>, ApiError> {
        let EditParams {
            prompt, negative_prompt, num_inference_steps, true_cfg_scale, seed, width, height, output_format, ..
        } = params;
        let request = EditRequest {
            images,
            prompt: prompt.clone(),
            negative_prompt,
            num_inference_steps,
            true_cfg_scale,
            seed,
            width,
            height,
            lightning: self.settings.lightning,
            noise: None,
        };
        let pre = model.preprocessor.clone();
        let prepared = self
            .pool
            .run(cancel, Some(memory), move || {
                let first = pre.prepare(request)?;
                let rest = (1..n as u64).map(|i| pre.reseed(&first, seed + i)).collect::<Result<Vec<_>, _>>()?;
                Ok(std::iter::once(first).chain(rest).collect::<Vec<_>>())
            })
            .await?;
        let jobs: Vec<Job> = prepared.into_iter().map(|prepared| Job { prepared, memory: Some(memory.clone()) }).collect();
        let preprocess = started.elapsed();

        let tickets = self.batcher.try_admit_many(n).ok_or_else(|| self.no_room(n))?;
        let key = jobs.first().ok_or_else(|| ApiError::internal("an edit without a job"))?.prepared.key().clone();
        let mut responses = Vec::with_capacity(n);
        for rx in self.batcher.submit_group(tickets, key, jobs) {
            let done = rx
                .await
                .map_err(|_| ApiError::internal("the batcher stopped before this job ran; retry the request"))?
                .map_err(ApiError::from)?;
            let encode_start = Instant::now();
            let out = done.output;
            let (image, width, height) = (out.image, out.width, out.height);
            let encoded = self
                .pool
                .run(cancel, Some(memory), move || Ok(super::images::encode_base64(&imaging::encode(&image, output_format)?)))
                .await?;
            let encode = encode_start.elapsed();
            self.metrics.stage("preprocess", done.batch_size, preprocess);
            self.metrics.stage("encode", done.batch_size, encode);
            responses.push(EditResponse {
                image: encoded,
                prompt: prompt.clone(),
                num_inference_steps: out.steps,
                lightning_enabled: out.lightning,
                seed: out.seed,
                width,
                height,
                true_cfg_scale,
                output_format: schema::format_name(output_format),
                timings: Timings {
                    preprocess_ms: ms(preprocess),
                    queue_ms: ms(done.queue_time),
                    compute_ms: ms(done.compute_time),
                    encode_ms: ms(encode),
                    batch_size: done.batch_size,
                },
            });
        }
        Ok(responses)
    }

    /// 503 `overloaded`: fewer than `n` queue places are free.
    fn no_room(&self, n: usize) -> ApiError {
        if n <= 1 {
            return self.queue_full();
        }
        ApiError::overloaded(
            format!(
                "the queue has no room for {n} images (MAX_QUEUE {}); retry after the Retry-After seconds or ask for fewer",
                self.settings.max_queue
            ),
            self.batcher.retry_after(),
        )
    }
}

/// What a request brings: its JSON body, or fields a front end parsed (a form).
enum Input {
    Body(Bytes),
    Fields(Box<RawInput>),
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
