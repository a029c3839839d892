//! One edit through the service: `EditService::edit` and its phases (see the module docs of
//! `service` for the contract): parse, images' bytes, memory admission, decode, prepare, queue,
//! batch, encode. Every phase checks the request's cancellation and holds its memory reservation.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use super::images::{Encoded, Loader};
use super::model::Job;
use super::schema::{self, EditParams, EditResponse, ImageSource, Timings};
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
        let timeout = self.settings.request_timeout;
        match tokio::time::timeout_at((started + timeout).into(), self.edit_untimed(admission, body, started)).await {
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

    async fn edit_untimed(&self, admission: Admission, body: Bytes, started: Instant) -> Result<EditResponse, ApiError> {
        let Admission { body_slot, memory } = admission;
        drop(body_slot); // the body is here: the slot is free for the next upload
        let cancel = Cancel::default();
        let _cancel_on_drop = cancel.on_drop();
        let model = self.loaded()?;
        // The body and the strings parsed from it.
        memory.at_least(2 * body.len() as u64 + MIN_REQUEST_BYTES).map_err(|r| r.to_api("this request"))?;
        let limits = model.limits.clone();
        let params = self
            .pool
            .run(&cancel, Some(&memory), move || schema::parse(&body, &limits, || u64::from(rand::random::<u32>())))
            .await?;
        let loader =
            Loader { fetcher: &self.fetcher, limits: self.image_limits, pool: &self.pool, cancel: &cancel, memory: &memory };
        let (params, images) = self.load_images(model, params, &loader).await?;
        self.run(model, params, images, &cancel, &memory, started).await
    }

    /// The images of a request: their bytes and headers, the memory admission, then the pixels.
    async fn load_images(
        &self,
        model: &LoadedModel,
        mut params: EditParams,
        loader: &Loader<'_>,
    ) -> Result<(EditParams, Vec<imaging::RgbImage>), ApiError> {
        let sources = std::mem::take(&mut params.images);
        let encoded_bytes: u64 = sources
            .iter()
            .map(|s| match s {
                ImageSource::Base64(b) => b.len() as u64 * 3 / 4,
                ImageSource::Url(_) => self.settings.url_max_bytes as u64,
            })
            .sum();
        let memory = loader.memory;
        memory.at_least(memory.bytes() + encoded_bytes).map_err(|r| r.to_api("this request's images"))?;
        let encoded = loader.encoded(sources).await?;
        self.admit_job(model, &params, &encoded, memory)?;
        let images = loader.decode(encoded).await?;
        Ok((params, images))
    }

    /// The memory admission, from the images' headers: the job's batch must fit the batch budget
    /// (413 `over_memory_limit` when it never can), its output `MAX_OUTPUT_PIXELS` (422), and its
    /// pixels, prepared tensors and result REQUEST_MEMORY (503 while it is full).
    fn admit_job(&self, model: &LoadedModel, p: &EditParams, encoded: &[Encoded], memory: &Reservation) -> Result<(), ApiError> {
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
        let extra = decode + model.preprocessor.prepared_bytes(&key) + output_bytes(&key);
        memory.at_least(memory.bytes() + extra).map_err(|r| r.to_api("this request's images"))
    }

    /// Prepares the job, takes its queue place, runs it in a batch and encodes the result.
    async fn run(
        &self,
        model: &LoadedModel,
        params: EditParams,
        images: Vec<imaging::RgbImage>,
        cancel: &Cancel,
        memory: &Reservation,
        started: Instant,
    ) -> Result<EditResponse, ApiError> {
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
        let prepared = self.pool.run(cancel, Some(memory), move || pre.prepare(request).map_err(ApiError::from)).await?;
        let preprocess = started.elapsed();

        let ticket = self.batcher.try_admit().ok_or_else(|| self.queue_full())?;
        let key = prepared.key().clone();
        let job = Job { prepared, memory: Some(memory.clone()) };
        let done = self
            .batcher
            .submit(ticket, key, job)
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
        Ok(EditResponse {
            image: encoded,
            prompt,
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
                encode_ms: ms(encode_start.elapsed()),
                batch_size: done.batch_size,
            },
        })
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
