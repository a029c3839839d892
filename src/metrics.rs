//! The server's Prometheus metrics (TGI/Triton-style names), one registry per server instance
//! (`metrics` + `metrics-exporter-prometheus`, not the process-global recorder, so several servers
//! in one process, as in tests, keep separate counts). Rendered by `GET /metrics`.
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `qwen_edit_requests_total{outcome}` | counter | /run + /runsync requests by outcome: `success`, `client_error`, `unauthorized`, `overloaded`, `not_ready`, `timeout`, `server_error`, `cancelled` |
//! | `qwen_edit_request_duration_seconds` | histogram | /run* wall time, headers to response |
//! | `qwen_edit_queue_duration_seconds` | histogram | time a job waited in the batcher |
//! | `qwen_edit_batch_inference_duration_seconds` | histogram | time the engine ran one batch |
//! | `qwen_edit_batch_size` | histogram | jobs per batch (average = `_sum / _count`) |
//! | `qwen_edit_queue_size` | gauge | jobs admitted and not yet running |
//! | `qwen_edit_jobs_cancelled_total` | counter | queued jobs dropped because the client went away |
//! | `qwen_edit_batch_failures_total` | counter | jobs that failed inside a batch |
//! | `qwen_edit_ready` | gauge | 1 when serving, 0 while loading, draining or stalled |
//! | `qwen_edit_batches_stopped_total` | counter | running batches stopped because nobody waited for them |
//! | `qwen_edit_batch_retries_total` | counter | failed batches whose jobs were run again one by one |
//! | `qwen_edit_cpu_tasks_running`, `qwen_edit_cpu_tasks_peak` | gauges | CPU tasks (parse, decode, prepare, encode) running now / most at once |
//! | `qwen_edit_cpu_tasks_skipped_total` | counter | CPU tasks not started because their request was gone |
//! | `qwen_edit_request_memory_bytes`, `qwen_edit_request_memory_peak_bytes` | gauges | REQUEST_MEMORY reserved now / most at once |
//! | `qwen_edit_connections` | gauge | open HTTP connections |
//! | `qwen_edit_{graph_captures,graph_replays,uncaptured_runs,graph_evictions,capture_failures}_total` | counter | CUDA graphs of the engines (TensorRT): captured, replayed, runs without a graph, dropped from the full cache, failed captures |
//! | `qwen_edit_{device_loop,host_loop}_steps_total` | counter | denoising steps on the device / stepped on the host |
//! | `qwen_edit_staged_host_copies_total` | counter | host copies of staged inputs before their upload (0 on the pinned staging path) |
//! | `qwen_edit_stage_duration_seconds{stage,batch_size}` | histogram | one pipeline stage of one batch: `text_encoder`, `vae_encoder`, `denoise_step` (one sample per step), `vae_decoder`; per job `preprocess` and `encode`, labelled with the batch the job ran in |
//! | `qwen_edit_process_resident_bytes`, `qwen_edit_process_resident_peak_bytes`, `qwen_edit_process_heap_in_use_bytes`, `qwen_edit_host_memory_available_bytes` | gauges | process RSS now / highest since the model loaded; bytes the allocator has handed out (glibc: a leak grows it, fragmentation does not); host (or cgroup) memory available |
//! | `qwen_edit_device_memory_total_bytes`, `qwen_edit_device_memory_used_bytes`, `qwen_edit_engine_memory_bytes{component,kind}` | gauges | the GPU (TensorRT only): its memory, and each engine's `weights`, `activation` and `io` bytes |
//! | `qwen_edit_batch_policy{policy}`, `qwen_edit_arrival_rate`, `qwen_edit_batch_wait_success`, `qwen_edit_batch_cost_per_image_seconds{batch_size}` | gauges | the batch wait policy in force and what it learned: jobs per second arriving, the share of recent waits that brought company, seconds per image by batch size (moving averages) |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::batcher::Observer;
use crate::runtime::counters::{CounterSnapshot, DeviceStatus, RunCounters};

/// Outcomes of a /run request (the `outcome` label).
pub const OUTCOMES: [&str; 8] =
    ["success", "client_error", "unauthorized", "overloaded", "not_ready", "timeout", "server_error", "cancelled"];

const DURATION_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    requests: Vec<(&'static str, Counter)>,
    /// The same counts, readable (`GET /queue/status`).
    outcomes: Vec<AtomicU64>,
    request_duration: Histogram,
    queue_duration: Histogram,
    batch_duration: Histogram,
    batch_size: Histogram,
    queue_size: Gauge,
    cancelled: Counter,
    batch_failures: Counter,
    ready: Gauge,
    stopped: Counter,
    retried: Counter,
    /// The loaded model's engine counters, once it is loaded.
    engine: OnceLock<Arc<RunCounters>>,
}

static META: Metadata<'static> = Metadata::new("qwen_edit", Level::INFO, None);
const ENGINE_HELP: &str = "Engine work counted by the loaded model's worker (see docs/tensorrt.md)";

impl Metrics {
    /// A fresh registry; `max_batch` sets the batch-size histogram's buckets (1..=max_batch).
    pub fn new(max_batch: usize) -> Metrics {
        let sizes: Vec<f64> = (1..=max_batch.max(1)).map(|n| n as f64).collect();
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &DURATION_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("qwen_edit_batch_size".into()), &sizes));
        // Both bucket lists are non-empty constants, so the builder cannot fail; fall back to summaries if it ever does.
        let recorder = builder.unwrap_or_else(|_| PrometheusBuilder::new()).build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(name.into(), None, help.into());
        };
        describe("qwen_edit_requests_total", "Edit requests (/run, /runsync) by outcome");
        describe("qwen_edit_request_duration_seconds", "Edit request wall time, from headers to response");
        describe("qwen_edit_queue_duration_seconds", "Time a job waited in the batcher before its batch started");
        describe("qwen_edit_batch_inference_duration_seconds", "Time the engine worker spent on one batch");
        describe("qwen_edit_batch_size", "Jobs per batch");
        describe("qwen_edit_queue_size", "Jobs admitted and not yet running");
        describe("qwen_edit_jobs_cancelled_total", "Queued jobs dropped before compute because the client went away");
        describe("qwen_edit_batch_failures_total", "Jobs that failed inside a batch (engine or pipeline error)");
        describe("qwen_edit_ready", "1 while serving, 0 while loading, draining or stalled");
        describe("qwen_edit_batches_stopped_total", "Running batches stopped because nobody waited for their results");
        describe("qwen_edit_batch_retries_total", "Failed batches whose jobs were run again one by one");
        describe("qwen_edit_cpu_tasks_running", "CPU tasks (parse, decode, prepare, encode) running now");
        describe("qwen_edit_cpu_tasks_peak", "Most CPU tasks that ever ran at once");
        describe("qwen_edit_cpu_tasks_skipped_total", "CPU tasks not started because their request was gone");
        describe("qwen_edit_request_memory_bytes", "Memory reserved by requests in flight (REQUEST_MEMORY)");
        describe("qwen_edit_request_memory_peak_bytes", "Most memory requests in flight ever reserved at once");
        describe("qwen_edit_connections", "Open HTTP connections");
        describe("qwen_edit_stage_duration_seconds", "One pipeline stage of one batch (denoise_step: each step), by batch size");
        describe("qwen_edit_process_resident_bytes", "Resident memory of the process");
        describe("qwen_edit_process_heap_in_use_bytes", "Bytes the allocator has handed out and not had back (glibc)");
        describe("qwen_edit_process_resident_peak_bytes", "Highest resident memory of the process since the model loaded");
        describe("qwen_edit_host_memory_available_bytes", "Memory the host (or the cgroup) still has available");
        describe("qwen_edit_device_memory_total_bytes", "Memory of the GPU (TensorRT)");
        describe("qwen_edit_device_memory_used_bytes", "Memory used on the GPU by every process (TensorRT)");
        describe("qwen_edit_engine_memory_bytes", "Device memory of each TensorRT engine: weights, activation, io");
        describe("qwen_edit_batch_policy", "The batch wait policy in force (BATCH_POLICY)");
        describe("qwen_edit_arrival_rate", "Jobs per second arriving at the batcher (moving average)");
        describe("qwen_edit_batch_wait_success", "Share of recent adaptive batch waits that brought company");
        describe("qwen_edit_batch_cost_per_image_seconds", "Engine seconds per image by batch size (moving average)");
        for (name, _) in CounterSnapshot::default().fields() {
            recorder.describe_counter(format!("qwen_edit_{name}_total").into(), None, ENGINE_HELP.into());
        }
        let counter = |name: &'static str| recorder.register_counter(&Key::from_name(name), &META);
        let histogram = |name: &'static str| recorder.register_histogram(&Key::from_name(name), &META);
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_name(name), &META);
        let requests = OUTCOMES
            .iter()
            .map(|o| {
                (
                    *o,
                    recorder
                        .register_counter(&Key::from_parts("qwen_edit_requests_total", vec![Label::new("outcome", *o)]), &META),
                )
            })
            .collect();
        Metrics {
            outcomes: OUTCOMES.iter().map(|_| AtomicU64::new(0)).collect(),
            requests,
            request_duration: histogram("qwen_edit_request_duration_seconds"),
            queue_duration: histogram("qwen_edit_queue_duration_seconds"),
            batch_duration: histogram("qwen_edit_batch_inference_duration_seconds"),
            batch_size: histogram("qwen_edit_batch_size"),
            queue_size: gauge("qwen_edit_queue_size"),
            cancelled: counter("qwen_edit_jobs_cancelled_total"),
            batch_failures: counter("qwen_edit_batch_failures_total"),
            ready: gauge("qwen_edit_ready"),
            stopped: counter("qwen_edit_batches_stopped_total"),
            retried: counter("qwen_edit_batch_retries_total"),
            engine: OnceLock::new(),
            recorder,
            handle,
        }
    }

    /// Counts one finished /run request.
    pub fn request(&self, outcome: &str, duration: Duration) {
        if let Some(i) = self.requests.iter().position(|(o, _)| *o == outcome) {
            self.requests[i].1.increment(1);
            self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
        self.request_duration.record(duration.as_secs_f64());
    }

    /// Requests counted so far, by outcome (every outcome, in [`OUTCOMES`] order).
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        OUTCOMES.iter().zip(&self.outcomes).map(|(o, n)| (*o, n.load(Ordering::Relaxed))).collect()
    }

    /// One stage of a batch of `batch` jobs took `d` (`qwen_edit_stage_duration_seconds`).
    pub fn stage(&self, stage: &'static str, batch: usize, d: Duration) {
        let labels = vec![Label::new("stage", stage), Label::new("batch_size", batch.to_string())];
        let key = Key::from_parts("qwen_edit_stage_duration_seconds", labels);
        self.recorder.register_histogram(&key, &META).record(d.as_secs_f64());
    }

    /// The device and its engines' memory (TensorRT, once the model is loaded).
    pub fn device_status(&self) -> Option<DeviceStatus> {
        self.engine.get()?.device.status()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(if ready { 1.0 } else { 0.0 });
    }

    /// A labelled info gauge (`qwen_edit_info{bundle, variant, backend} 1`).
    pub fn set_info(&self, labels: &[(&'static str, String)]) {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect();
        self.recorder.register_gauge(&Key::from_parts("qwen_edit_info", labels), &META).set(1.0);
    }

    /// Reports the engine counters of the loaded model (graph captures, replays, ...).
    pub fn set_engine_counters(&self, counters: Arc<RunCounters>) {
        let _ = self.engine.set(counters);
    }

    /// The engine counters as of now (None before a model is loaded).
    pub fn engine_counters(&self) -> Option<CounterSnapshot> {
        self.engine.get().map(|c| c.snapshot())
    }

    /// The Prometheus text, with the queue size and engine counters as of now.
    pub fn render(&self, queue_size: usize) -> String {
        self.queue_size.set(queue_size as f64);
        if let Some(s) = self.engine_counters() {
            for (name, v) in s.fields() {
                self.recorder.register_counter(&Key::from_name(format!("qwen_edit_{name}_total")), &META).absolute(v);
            }
        }
        self.handle.render()
    }

    /// Sets a plain gauge (values read when /metrics is scraped: CPU tasks, memory, connections).
    pub fn gauge(&self, name: &'static str, value: f64) {
        self.recorder.register_gauge(&Key::from_name(name), &META).set(value);
    }

    /// Sets a labelled gauge.
    pub fn labelled_gauge(&self, name: &'static str, labels: &[(&'static str, String)], value: f64) {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect();
        self.recorder.register_gauge(&Key::from_parts(name, labels), &META).set(value);
    }

    /// Drains histogram samples into their buckets; call every few seconds so memory stays flat
    /// when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Observer for Metrics {
    fn batch_started(&self, size: usize, queue_times: &[Duration]) {
        self.batch_size.record(size as f64);
        for q in queue_times {
            self.queue_duration.record(q.as_secs_f64());
        }
    }
    fn batch_finished(&self, _size: usize, compute: Duration, failed: usize) {
        self.batch_duration.record(compute.as_secs_f64());
        self.batch_failures.increment(failed as u64);
    }
    fn cancelled(&self, n: usize) {
        self.cancelled.increment(n as u64);
    }
    fn batch_stopped(&self, _size: usize) {
        self.stopped.increment(1);
    }
    fn batch_retried(&self, _size: usize) {
        self.retried.increment(1);
    }
}

/// Reads one sample from Prometheus text: `name` with an optional `{labels}` exactly as rendered.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_histograms_and_gauges() {
        let m = Metrics::new(4);
        m.request("success", Duration::from_millis(20));
        m.request("overloaded", Duration::from_millis(1));
        m.request("no-such-outcome", Duration::from_millis(1));
        m.batch_started(3, &[Duration::from_millis(5); 3]);
        m.batch_started(1, &[Duration::from_millis(40)]);
        m.batch_finished(3, Duration::from_millis(250), 1);
        m.cancelled(2);
        m.set_ready(true);
        m.set_info(&[("bundle", "tiny".into())]);
        m.batch_stopped(2);
        m.batch_retried(3);
        m.gauge("qwen_edit_cpu_tasks_peak", 2.0);
        m.labelled_gauge("qwen_edit_batch_cost_per_image_seconds", &[("batch_size", "2".into())], 0.25);
        for _ in 0..3 {
            m.stage("denoise_step", 2, Duration::from_millis(3));
        }
        m.stage("text_encoder", 2, Duration::from_millis(30));
        let t = m.render(7);
        assert_eq!(
            sample(&t, "qwen_edit_stage_duration_seconds_count{stage=\"denoise_step\",batch_size=\"2\"}"),
            Some(3.0),
            "{t}"
        );
        assert_eq!(sample(&t, "qwen_edit_stage_duration_seconds_sum{stage=\"text_encoder\",batch_size=\"2\"}"), Some(0.03));
        assert_eq!(sample(&t, "qwen_edit_batch_cost_per_image_seconds{batch_size=\"2\"}"), Some(0.25));
        let outcomes = m.outcomes();
        assert_eq!(outcomes.len(), OUTCOMES.len());
        assert_eq!(outcomes.iter().find(|(o, _)| *o == "overloaded"), Some(&("overloaded", 1)));
        assert_eq!(outcomes.iter().map(|(_, n)| n).sum::<u64>(), 2, "the unknown outcome is not counted");
        assert_eq!(sample(&t, "qwen_edit_batches_stopped_total"), Some(1.0), "{t}");
        assert_eq!(sample(&t, "qwen_edit_batch_retries_total"), Some(1.0));
        assert_eq!(sample(&t, "qwen_edit_cpu_tasks_peak"), Some(2.0));
        assert_eq!(sample(&t, "qwen_edit_requests_total{outcome=\"success\"}"), Some(1.0), "{t}");
        assert_eq!(sample(&t, "qwen_edit_requests_total{outcome=\"overloaded\"}"), Some(1.0));
        assert_eq!(sample(&t, "qwen_edit_requests_total{outcome=\"timeout\"}"), Some(0.0));
        assert_eq!(sample(&t, "qwen_edit_batch_size_sum"), Some(4.0));
        assert_eq!(sample(&t, "qwen_edit_batch_size_count"), Some(2.0));
        assert_eq!(sample(&t, "qwen_edit_batch_size_bucket{le=\"1\"}"), Some(1.0), "{t}");
        assert_eq!(sample(&t, "qwen_edit_queue_duration_seconds_count"), Some(4.0));
        assert_eq!(sample(&t, "qwen_edit_request_duration_seconds_count"), Some(3.0));
        assert_eq!(sample(&t, "qwen_edit_batch_inference_duration_seconds_count"), Some(1.0));
        assert_eq!(sample(&t, "qwen_edit_queue_size"), Some(7.0));
        assert_eq!(sample(&t, "qwen_edit_jobs_cancelled_total"), Some(2.0));
        assert_eq!(sample(&t, "qwen_edit_batch_failures_total"), Some(1.0));
        assert_eq!(sample(&t, "qwen_edit_ready"), Some(1.0));
        assert_eq!(sample(&t, "qwen_edit_info{bundle=\"tiny\"}"), Some(1.0));
        assert!(t.contains("# HELP qwen_edit_batch_size Jobs per batch"), "{t}");
        assert_eq!(sample(&t, "qwen_edit_graph_replays_total"), None, "no engine counters before a model loads");
        let c = Arc::new(RunCounters::default());
        m.set_engine_counters(c.clone());
        c.add(crate::runtime::counters::Counter::GraphReplays, 5);
        c.add(crate::runtime::counters::Counter::HostLoopSteps, 2);
        let t = m.render(0);
        assert_eq!(sample(&t, "qwen_edit_graph_replays_total"), Some(5.0), "{t}");
        assert_eq!(sample(&t, "qwen_edit_host_loop_steps_total"), Some(2.0));
        assert_eq!(sample(&t, "qwen_edit_uncaptured_runs_total"), Some(0.0));
        assert_eq!(m.engine_counters().unwrap().graph_replays, 5);
        // Separate instances count separately.
        assert_eq!(sample(&Metrics::new(4).render(0), "qwen_edit_requests_total{outcome=\"success\"}"), Some(0.0));
    }
}
