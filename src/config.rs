//! Settings of `qwen-edit serve` and `qwen-edit worker`: command-line flags, each also read from the
//! environment under the names users of the Python server already have (`API_HOST`, `BATCH_SIZE`, ...).
//!
//! Precedence: a flag beats its environment variable beats the default. The service's flags
//! (`ServiceArgs`) are shared; `serve` adds HTTP's (`ServeArgs`), `worker` RunPod's (`WorkerArgs`,
//! the variables the official `runpod` library reads). `Settings::from_args` / `from_service_args`
//! and `WorkerMode::from_args` validate everything once at start-up, so nothing runs with a
//! nonsensical value.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::ArgAction;
use ipnet::IpNet;

use crate::batcher::WaitMode;
use crate::bundle::PrecisionMode;
use crate::runtime::backend::BackendRequest;

/// Default body limit: a 20 MiB image sent as base64 (4/3 of it, 27.96 MB) plus the JSON around it.
pub const DEFAULT_MAX_BODY_BYTES: usize = 28 * 1024 * 1024;
/// Default memory budget of the /v2 job store (queued inputs and kept results): 1 GiB.
pub const DEFAULT_RESULT_MEMORY_BYTES: usize = 1024 * 1024 * 1024;
/// Default largest `n` of POST /v1/images/edits (lowered to MAX_QUEUE when that is smaller).
pub const DEFAULT_MAX_N: usize = 10;

/// Default largest output: 2048 x 2048.
pub const DEFAULT_MAX_OUTPUT_PIXELS: u64 = 2048 * 2048;

/// Grace before `BODY_MIN_RATE` applies to an upload.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(5);

/// Flags of `qwen-edit serve` (each with its environment variable): the service's, plus HTTP's own.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "API_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on (0 = any free port; the chosen one is logged).
    #[arg(long, env = "API_PORT", default_value_t = 8000)]
    pub port: u16,
    #[command(flatten)]
    pub service: ServiceArgs,
    /// If set, /run, /runsync and /v2/... require `Authorization: Bearer <API_KEY>` (/v2 also takes the raw key).
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A file holding the API key (its content, trimmed; e.g. a mounted secret). Not with API_KEY.
    #[arg(long, env = "API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Slowest accepted upload in bytes per second, after a grace of 5 s (408 `body_timeout` below it).
    #[arg(long, env = "BODY_MIN_RATE", default_value_t = 16384)]
    pub body_min_rate: u64,
    /// Open connections at once (beyond it a new connection gets 503 and is closed).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a response may be stuck (the client reads nothing) before its connection is closed.
    #[arg(long, env = "RESPONSE_WRITE_TIMEOUT", default_value_t = 30.0)]
    pub response_write_timeout: f64,
    /// Seconds a client has to send the request headers (slow-client guard).
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Seconds a client has to send the request body once its queue place is taken (408 after it).
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value_t = 60.0)]
    pub body_read_timeout: f64,
    /// Requests slower than this many milliseconds are logged as warnings.
    #[arg(long, env = "SLOW_REQUEST_MS", default_value_t = 10_000)]
    pub slow_request_ms: u64,
    /// Seconds a finished /v2 job's result is kept for `status` (/v2 runsync results: at most 60 s).
    #[arg(long, env = "RESULT_TTL", default_value_t = 1800.0)]
    pub result_ttl: f64,
    /// Memory budget of the /v2 job store in bytes: queued inputs plus kept results; past it the
    /// oldest results go (their status is then 404), and /v2 run answers 503 when inputs alone fill it.
    #[arg(long, env = "RESULT_MEMORY_BYTES", default_value_t = DEFAULT_RESULT_MEMORY_BYTES)]
    pub result_memory_bytes: usize,
    /// Largest `n` (images per request) of POST /v1/images/edits; at most MAX_QUEUE [default: 10, or
    /// MAX_QUEUE when that is smaller].
    #[arg(long, env = "MAX_N")]
    pub max_n: Option<usize>,
    /// Most parts in one multipart/form-data body (POST /v1/images/edits); 400 beyond.
    #[arg(long, env = "MULTIPART_MAX_PARTS", default_value_t = 64)]
    pub multipart_max_parts: usize,
    /// Largest part of a multipart/form-data body, in bytes (an uploaded image); 413 beyond. The whole
    /// body is bounded by MAX_BODY_BYTES.
    #[arg(long, env = "MULTIPART_MAX_PART_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub multipart_max_part_bytes: usize,
}

/// Flags of the edit service, shared by `qwen-edit serve` and `qwen-edit worker`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServiceArgs {
    /// Model bundle directory.
    #[arg(long, env = "QWEN_EDIT_BUNDLE", default_value = "engines/tiny")]
    pub bundle: PathBuf,
    /// Backend: auto (TensorRT when a GPU and engines are present, else CPU), ort/cpu, tensorrt.
    #[arg(long, env = "QWEN_EDIT_BACKEND", default_value = "auto")]
    pub backend: BackendRequest,
    /// Largest batch the engine worker runs.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 4)]
    pub batch_size: usize,
    /// How long the oldest job of a partial batch waits for company before the batch runs anyway.
    #[arg(long, env = "BATCH_TIMEOUT_MS", default_value_t = 40)]
    pub batch_timeout_ms: u64,
    /// Whether a partial batch waits BATCH_TIMEOUT_MS for company always (fixed) or only when the
    /// recent arrivals and the measured batch costs say it pays (adaptive).
    #[arg(long, env = "BATCH_POLICY", default_value = "adaptive")]
    pub batch_policy: String,
    /// Use the Lightning schedule (and the Lightning LoRA fused into the bundle, if it has one).
    #[arg(long = "lightning", env = "USE_LIGHTNING_LORA", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub use_lightning_lora: bool,
    /// Default number of steps when Lightning is on.
    #[arg(long, env = "LIGHTNING_STEPS", default_value_t = 8)]
    pub lightning_steps: u32,
    /// Precision to run: auto (what the bundle has), fp32, fp16, bf16, fp8 (alias 8bit: the bundle's FP8
    /// transformer). Anything but auto must be what the bundle carries, else start-up fails naming the fix.
    #[arg(long = "precision", env = "PRECISION_MODE", default_value = "auto")]
    pub precision_mode: String,
    /// On ONNX Runtime, run a bfloat16 bundle as float32 twins of its graphs (exact widening, twice the weights'
    /// memory): a reference for a GPU's bfloat16 engines (scripts/gpu-smoke.sh). Off, such a bundle fails to load.
    #[arg(long = "ort-bf16-as-f32", env = "ORT_BF16_AS_F32", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub ort_bf16_as_f32: bool,
    /// Jobs admitted but not yet running (reading, decoding, preparing, queued); beyond it: 503.
    #[arg(long, env = "MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Seconds one request may take from its headers to its response (504 after it).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Largest request body (or worker job) in bytes (413 above it). The default fits a 20 MiB image as base64.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Let image_url (and /v2 webhooks) reach non-public addresses: `false` (default), `true` (any,
    /// except cloud metadata endpoints), or a comma-separated list of addresses/CIDRs (e.g. `10.0.0.0/8,127.0.0.1`).
    #[arg(long, env = "ALLOW_PRIVATE_URLS", default_value = "false")]
    pub allow_private_urls: String,
    /// Directory whose regular files `image_path` inputs may read (unset: image_path is refused).
    #[arg(long, env = "IMAGE_PATH_ROOT")]
    pub image_path_root: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Seconds to finish queued and in-flight jobs after SIGTERM/SIGINT before giving up.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value_t = 60.0)]
    pub shutdown_timeout: f64,
    /// Longest accepted prompt / negative prompt, in characters (the bundle also limits tokens).
    #[arg(long, env = "MAX_PROMPT_CHARS", default_value_t = 4096)]
    pub max_prompt_chars: usize,
    /// Largest input image side in pixels (checked from the header, before decoding).
    #[arg(long, env = "MAX_IMAGE_SIDE", default_value_t = 8192)]
    pub max_image_side: u32,
    /// Largest input image in megapixels (checked from the header, before decoding).
    #[arg(long, env = "MAX_IMAGE_MEGAPIXELS", default_value_t = 40.0)]
    pub max_image_megapixels: f64,
    /// Largest requested output side (`width`/`height`), in pixels.
    #[arg(long, env = "MAX_OUTPUT_SIDE", default_value_t = 2048)]
    pub max_output_side: u32,
    /// Largest image_url download (and image_path file) in bytes.
    #[arg(long, env = "URL_MAX_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub url_max_bytes: usize,
    /// Seconds for the whole image_url fetch (all redirects and retries).
    #[arg(long, env = "URL_TIMEOUT", default_value_t = 20.0)]
    pub url_timeout: f64,
    /// Seconds to open one connection for image_url.
    #[arg(long, env = "URL_CONNECT_TIMEOUT", default_value_t = 5.0)]
    pub url_connect_timeout: f64,
    /// Extra attempts for a transient image_url failure (connect error, timeout, 5xx, 429).
    #[arg(long, env = "URL_RETRIES", default_value_t = 2)]
    pub url_retries: u32,
    /// Ports image_url may reach on public addresses (comma-separated, or `any`); networks opened by
    /// ALLOW_PRIVATE_URLS are reachable on every port.
    #[arg(long, env = "URL_ALLOWED_PORTS", default_value = "80,443")]
    pub url_allowed_ports: String,
    /// Largest num_inference_steps a request may ask for (422 above it).
    #[arg(long, env = "MAX_STEPS", default_value_t = 100)]
    pub max_steps: u32,
    /// Largest output a request may ask for, in pixels (width x height, after the defaults; 422 above it).
    #[arg(long, env = "MAX_OUTPUT_PIXELS", default_value_t = DEFAULT_MAX_OUTPUT_PIXELS)]
    pub max_output_pixels: u64,
    /// Memory the whole server may use: the loaded model, requests in flight and one batch (bytes, or
    /// with a unit: 24G, 6000M). Default: the machine's or the container's memory minus 10%.
    #[arg(long, env = "MEMORY_LIMIT")]
    pub memory_limit: Option<String>,
    /// Memory requests in flight may hold (bodies, decoded images, prepared jobs, results); beyond it
    /// 503 `overloaded`. Default: a quarter of MEMORY_LIMIT.
    #[arg(long, env = "REQUEST_MEMORY")]
    pub request_memory: Option<String>,
    /// Request bodies being received at once (beyond it: 503 at once, before the body is read).
    #[arg(long, env = "MAX_BODY_READERS", default_value_t = 128)]
    pub max_body_readers: usize,
    /// A batch running longer than this many times its expected time (from the recent speed) plus
    /// 30 s turns /health to `stalled` (503) and is logged; 0 turns the watchdog off.
    #[arg(long, env = "WATCHDOG_FACTOR", default_value_t = 4.0)]
    pub watchdog_factor: f64,
}

/// Flags of `qwen-edit worker`: the service's, plus the RunPod serverless variables (the names the
/// official `runpod` library reads).
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Job-take URL (`$ID` = the pod id). Unset: local test mode (`--test-input` or ./test_input.json).
    #[arg(long, env = "RUNPOD_WEBHOOK_GET_JOB")]
    pub get_job_url: Option<String>,
    /// Result URL (`$RUNPOD_POD_ID` = the pod id, `$ID` = the job id).
    #[arg(long, env = "RUNPOD_WEBHOOK_POST_OUTPUT")]
    pub post_output_url: Option<String>,
    /// Heartbeat URL (`$RUNPOD_POD_ID` = the pod id).
    #[arg(long, env = "RUNPOD_WEBHOOK_PING")]
    pub ping_url: Option<String>,
    /// Milliseconds between heartbeats.
    #[arg(long, env = "RUNPOD_PING_INTERVAL", default_value_t = 10_000)]
    pub ping_interval_ms: u64,
    /// This worker's id (RunPod sets it; without it no heartbeat is sent).
    #[arg(long, env = "RUNPOD_POD_ID")]
    pub pod_id: Option<String>,
    /// The key sent as `Authorization` on every control-plane call (without it no heartbeat is sent).
    #[arg(long, env = "RUNPOD_AI_API_KEY", hide_env_values = true)]
    pub runpod_api_key: Option<String>,
    /// Run this one job (`{"input": {...}}`, optionally with an `id`) locally, print its result and exit.
    #[arg(long = "test-input", alias = "test_input")]
    pub test_input: Option<String>,
}

/// How `image_url` may reach non-public addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrivateUrls {
    /// Only public addresses (the default).
    Deny,
    /// Any address except the cloud metadata endpoints.
    AllowAll,
    /// Public addresses plus these networks (metadata endpoints stay blocked).
    Allow(Vec<IpNet>),
}

impl std::str::FromStr for PrivateUrls {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "" | "0" | "false" | "no" | "off" => return Ok(PrivateUrls::Deny),
            "1" | "true" | "yes" | "on" => return Ok(PrivateUrls::AllowAll),
            _ => {}
        }
        let mut nets = Vec::new();
        for part in t.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => part
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| format!("ALLOW_PRIVATE_URLS: `{part}` is not true/false, an IP address or a CIDR network"))?,
            };
            nets.push(net);
        }
        Ok(PrivateUrls::Allow(nets))
    }
}

/// Log output format.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub addr: SocketAddr,
    pub bundle: PathBuf,
    pub backend: BackendRequest,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub batch_policy: WaitMode,
    pub lightning: bool,
    pub lightning_steps: u32,
    pub precision: PrecisionMode,
    pub ort_bf16_as_f32: bool,
    pub max_queue: usize,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
    pub private_urls: PrivateUrls,
    pub log_format: LogFormat,
    pub shutdown_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub slow_request: Duration,
    pub max_prompt_chars: usize,
    pub max_image_side: u32,
    pub max_image_pixels: u64,
    pub max_output_side: u32,
    pub url_max_bytes: usize,
    pub url_timeout: Duration,
    pub url_connect_timeout: Duration,
    pub url_retries: u32,
    /// Ports image_url may reach on public addresses; `None`: any.
    pub url_allowed_ports: Option<Vec<u16>>,
    pub max_steps: u32,
    pub max_output_pixels: u64,
    /// `None`: what the machine or container gives, minus a margin (resolved at start).
    pub memory_limit: Option<u64>,
    /// `None`: a quarter of the memory limit.
    pub request_memory: Option<u64>,
    pub max_body_readers: usize,
    pub body_min_rate: u64,
    pub max_connections: usize,
    pub response_write_timeout: Duration,
    pub watchdog_factor: f64,
    /// `IMAGE_PATH_ROOT`, canonical (symlinks and `..` resolved); `None` = image_path is off.
    pub image_path_root: Option<PathBuf>,
    /// How long a finished /v2 job's result is kept.
    pub result_ttl: Duration,
    /// Memory budget of the /v2 job store (queued inputs and kept results), bytes.
    pub result_memory_bytes: usize,
    /// Largest `n` of POST /v1/images/edits.
    pub max_n: usize,
    /// Most parts, and the largest part in bytes, of a multipart/form-data body.
    pub multipart_max_parts: usize,
    pub multipart_max_part_bytes: usize,
}

/// A setting that makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

fn bad(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError { name, reason: reason.into() }
}

fn seconds(name: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(bad(name, format!("{v} is not a number of seconds in (0, 86400]")));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The limits of hostile clients and memory (issues 11 and 21): MAX_STEPS, MAX_OUTPUT_PIXELS,
/// MEMORY_LIMIT / REQUEST_MEMORY (returned, parsed), MAX_BODY_READERS, WATCHDOG_FACTOR (the service's;
/// MAX_CONNECTIONS is checked with HTTP's settings).
fn hardening_limits(a: &ServiceArgs) -> Result<(Option<u64>, Option<u64>), ConfigError> {
    if !(1..=1000).contains(&a.max_steps) {
        return Err(bad("MAX_STEPS", format!("{} is not in 1..=1000", a.max_steps)));
    }
    if a.lightning_steps > a.max_steps {
        return Err(bad("LIGHTNING_STEPS", format!("{} is above MAX_STEPS ({})", a.lightning_steps, a.max_steps)));
    }
    if !(256..=(1 << 28)).contains(&a.max_output_pixels) {
        return Err(bad("MAX_OUTPUT_PIXELS", format!("{} is not in 256..=268435456", a.max_output_pixels)));
    }
    let size = |name: &'static str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
        match v.as_deref().map(str::trim) {
            None | Some("") | Some("auto") => Ok(None),
            Some(t) => match crate::sysmem::parse_bytes(t) {
                Ok(n) if n >= 64 << 20 => Ok(Some(n)),
                Ok(n) => Err(bad(name, format!("{n} bytes is less than 64 MiB"))),
                Err(e) => Err(bad(name, e)),
            },
        }
    };
    let (memory_limit, request_memory) = (size("MEMORY_LIMIT", &a.memory_limit)?, size("REQUEST_MEMORY", &a.request_memory)?);
    if let (Some(l), Some(r)) = (memory_limit, request_memory) {
        if r >= l {
            return Err(bad("REQUEST_MEMORY", format!("{r} bytes is not below MEMORY_LIMIT ({l} bytes)")));
        }
    }
    if a.max_body_readers == 0 {
        return Err(bad("MAX_BODY_READERS", "need at least 1 body reader"));
    }
    if !(a.watchdog_factor.is_finite() && a.watchdog_factor >= 0.0) {
        return Err(bad("WATCHDOG_FACTOR", format!("{} is not a number >= 0", a.watchdog_factor)));
    }
    Ok((memory_limit, request_memory))
}

impl Settings {
    /// Validates the flags of `serve`.
    pub fn from_args(a: &ServeArgs) -> Result<Settings, ConfigError> {
        let service = Settings::from_service_args(&a.service)?;
        let api_key = api_key(a)?;
        if a.max_connections < 2 {
            return Err(bad("MAX_CONNECTIONS", "need at least 2 connections"));
        }
        if a.result_memory_bytes < 64 * 1024 {
            return Err(bad("RESULT_MEMORY_BYTES", format!("{} bytes is less than 64 KiB", a.result_memory_bytes)));
        }
        let max_n = a.max_n.unwrap_or(DEFAULT_MAX_N.min(service.max_queue));
        if max_n == 0 || max_n > service.max_queue {
            return Err(bad("MAX_N", format!("{max_n} is not in 1..=MAX_QUEUE ({})", service.max_queue)));
        }
        if !(2..=10_000).contains(&a.multipart_max_parts) {
            return Err(bad("MULTIPART_MAX_PARTS", format!("{} is not in 2..=10000", a.multipart_max_parts)));
        }
        if a.multipart_max_part_bytes < 1024 {
            return Err(bad(
                "MULTIPART_MAX_PART_BYTES",
                format!("{} bytes is too small for any image", a.multipart_max_part_bytes),
            ));
        }
        Ok(Settings {
            addr: SocketAddr::new(a.host, a.port),
            api_key,
            header_read_timeout: seconds("HEADER_READ_TIMEOUT", a.header_read_timeout)?,
            body_read_timeout: seconds("BODY_READ_TIMEOUT", a.body_read_timeout)?,
            slow_request: Duration::from_millis(a.slow_request_ms),
            result_ttl: seconds("RESULT_TTL", a.result_ttl)?,
            result_memory_bytes: a.result_memory_bytes,
            max_n,
            multipart_max_parts: a.multipart_max_parts,
            multipart_max_part_bytes: a.multipart_max_part_bytes,
            body_min_rate: a.body_min_rate,
            max_connections: a.max_connections,
            response_write_timeout: seconds("RESPONSE_WRITE_TIMEOUT", a.response_write_timeout)?,
            ..service
        })
    }

    /// Validates the service's flags (shared by `serve` and `worker`); HTTP-only settings keep their defaults.
    pub fn from_service_args(a: &ServiceArgs) -> Result<Settings, ConfigError> {
        if !(1..=64).contains(&a.batch_size) {
            return Err(bad("BATCH_SIZE", format!("{} is not in 1..=64", a.batch_size)));
        }
        if a.batch_timeout_ms > 60_000 {
            return Err(bad("BATCH_TIMEOUT_MS", format!("{} ms is more than a minute", a.batch_timeout_ms)));
        }
        if !(1..=100).contains(&a.lightning_steps) {
            return Err(bad("LIGHTNING_STEPS", format!("{} is not in 1..=100", a.lightning_steps)));
        }
        let precision: PrecisionMode = a.precision_mode.parse().map_err(|e| bad("PRECISION_MODE", e))?;
        if a.max_queue == 0 || a.max_queue > 100_000 {
            return Err(bad("MAX_QUEUE", format!("{} is not in 1..=100000", a.max_queue)));
        }
        if a.max_body_bytes < 1024 {
            return Err(bad("MAX_BODY_BYTES", format!("{} bytes is too small for any request", a.max_body_bytes)));
        }
        let log_format = match a.log_format.trim().to_ascii_lowercase().as_str() {
            "text" | "pretty" | "plain" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(bad("LOG_FORMAT", format!("`{other}` is not text or json"))),
        };
        if a.max_prompt_chars == 0 {
            return Err(bad("MAX_PROMPT_CHARS", "must be at least 1"));
        }
        if !(16..=65_535).contains(&a.max_image_side) {
            return Err(bad("MAX_IMAGE_SIDE", format!("{} is not in 16..=65535", a.max_image_side)));
        }
        if !(a.max_image_megapixels.is_finite() && a.max_image_megapixels > 0.0 && a.max_image_megapixels <= 1000.0) {
            return Err(bad("MAX_IMAGE_MEGAPIXELS", format!("{} is not in (0, 1000]", a.max_image_megapixels)));
        }
        if !(16..=16_384).contains(&a.max_output_side) {
            return Err(bad("MAX_OUTPUT_SIDE", format!("{} is not in 16..=16384", a.max_output_side)));
        }
        if a.url_retries > 10 {
            return Err(bad("URL_RETRIES", format!("{} is more than 10", a.url_retries)));
        }
        let (memory_limit, request_memory) = hardening_limits(a)?;
        Ok(Settings {
            bundle: a.bundle.clone(),
            backend: a.backend,
            batch_size: a.batch_size,
            batch_timeout: Duration::from_millis(a.batch_timeout_ms),
            batch_policy: a.batch_policy.parse().map_err(|e| bad("BATCH_POLICY", e))?,
            lightning: a.use_lightning_lora,
            lightning_steps: a.lightning_steps,
            precision,
            ort_bf16_as_f32: a.ort_bf16_as_f32,
            max_queue: a.max_queue,
            request_timeout: seconds("REQUEST_TIMEOUT", a.request_timeout)?,
            max_body_bytes: a.max_body_bytes,
            private_urls: a.allow_private_urls.parse().map_err(|e| bad("ALLOW_PRIVATE_URLS", e))?,
            log_format,
            shutdown_timeout: seconds("SHUTDOWN_TIMEOUT", a.shutdown_timeout)?,
            max_prompt_chars: a.max_prompt_chars,
            max_image_side: a.max_image_side,
            max_image_pixels: (a.max_image_megapixels * 1e6) as u64,
            max_output_side: a.max_output_side,
            url_max_bytes: a.url_max_bytes,
            url_timeout: seconds("URL_TIMEOUT", a.url_timeout)?,
            url_connect_timeout: seconds("URL_CONNECT_TIMEOUT", a.url_connect_timeout)?,
            url_retries: a.url_retries,
            url_allowed_ports: ports(&a.url_allowed_ports)?,
            max_steps: a.max_steps,
            max_output_pixels: a.max_output_pixels,
            memory_limit,
            request_memory,
            max_body_readers: a.max_body_readers,
            watchdog_factor: a.watchdog_factor,
            image_path_root: image_path_root(a.image_path_root.as_deref())?,
            ..Settings::builtin()
        })
    }

    /// The documented defaults, independent of the environment.
    pub fn builtin() -> Settings {
        Settings {
            addr: SocketAddr::from(([0, 0, 0, 0], 8000)),
            bundle: PathBuf::from("engines/tiny"),
            backend: BackendRequest::Auto,
            batch_size: 4,
            batch_timeout: Duration::from_millis(40),
            batch_policy: WaitMode::Adaptive,
            lightning: false,
            lightning_steps: 8,
            precision: PrecisionMode::Auto,
            ort_bf16_as_f32: false,
            max_queue: 64,
            request_timeout: Duration::from_secs(300),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            api_key: None,
            private_urls: PrivateUrls::Deny,
            log_format: LogFormat::Text,
            shutdown_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            slow_request: Duration::from_secs(10),
            max_prompt_chars: 4096,
            max_image_side: 8192,
            max_image_pixels: 40_000_000,
            max_output_side: 2048,
            url_max_bytes: 20 * 1024 * 1024,
            url_timeout: Duration::from_secs(20),
            url_connect_timeout: Duration::from_secs(5),
            url_retries: 2,
            url_allowed_ports: Some(vec![80, 443]),
            max_steps: 100,
            max_output_pixels: DEFAULT_MAX_OUTPUT_PIXELS,
            memory_limit: None,
            request_memory: None,
            max_body_readers: 128,
            body_min_rate: 16384,
            max_connections: 1024,
            response_write_timeout: Duration::from_secs(30),
            watchdog_factor: 4.0,
            image_path_root: None,
            result_ttl: Duration::from_secs(1800),
            result_memory_bytes: DEFAULT_RESULT_MEMORY_BYTES,
            max_n: DEFAULT_MAX_N,
            multipart_max_parts: 64,
            multipart_max_part_bytes: 20 * 1024 * 1024,
        }
    }
}

/// The API key from API_KEY or API_KEY_FILE: a key of only whitespace is an error (it would turn
/// authentication off without a word); an empty API_KEY means none.
fn api_key(a: &ServeArgs) -> Result<Option<String>, ConfigError> {
    let from_file = match &a.api_key_file {
        None => None,
        Some(path) => {
            if a.api_key.as_deref().is_some_and(|k| !k.is_empty()) {
                return Err(bad("API_KEY_FILE", "API_KEY is set too: give the key one way"));
            }
            let text =
                std::fs::read_to_string(path).map_err(|e| bad("API_KEY_FILE", format!("cannot read {}: {e}", path.display())))?;
            if text.trim().is_empty() {
                return Err(bad("API_KEY_FILE", format!("{} is empty or only whitespace", path.display())));
            }
            Some(text.trim().to_string())
        }
    };
    match (from_file, a.api_key.as_deref()) {
        (Some(k), _) => Ok(Some(k)),
        (None, None | Some("")) => Ok(None),
        (None, Some(k)) if k.trim().is_empty() => {
            Err(bad("API_KEY", "is only whitespace, which would turn authentication off; unset it or give a real key"))
        }
        (None, Some(k)) => Ok(Some(k.trim().to_string())),
    }
}

/// `URL_ALLOWED_PORTS`: a comma-separated list of ports, or `any`/`*`.
fn ports(s: &str) -> Result<Option<Vec<u16>>, ConfigError> {
    let t = s.trim().to_ascii_lowercase();
    if t == "any" || t == "*" {
        return Ok(None);
    }
    let list = t
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u16>().ok().filter(|&n| n > 0).ok_or_else(|| bad("URL_ALLOWED_PORTS", format!("`{p}` is not a port"))))
        .collect::<Result<Vec<u16>, _>>()?;
    if list.is_empty() {
        return Err(bad("URL_ALLOWED_PORTS", "lists no port (use `any` to allow every port)"));
    }
    Ok(Some(list))
}

/// What `qwen-edit worker` does, validated from its flags.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerMode {
    /// Run one job and exit: the `--test-input` JSON, or (`None`) ./test_input.json.
    Local { test_input: Option<String> },
    /// Take jobs from RunPod's control plane until SIGTERM.
    RunPod(RunPodSettings),
}

/// The RunPod serverless variables, checked. URL templates keep their `$ID` / `$RUNPOD_POD_ID`
/// placeholders; the worker fills them in.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPodSettings {
    pub get_job_url: String,
    pub post_output_url: String,
    pub ping_url: Option<String>,
    pub ping_interval: Duration,
    /// `RUNPOD_POD_ID`; `None`: the worker makes one up and sends no heartbeat (as the Python library).
    pub pod_id: Option<String>,
    /// `RUNPOD_AI_API_KEY`, sent raw (no `Bearer`) as the Python library does; may be empty.
    pub api_key: String,
}

impl WorkerMode {
    /// Local when `--test-input` is given or `RUNPOD_WEBHOOK_GET_JOB` is unset (the Python library's rule).
    pub fn from_args(a: &WorkerArgs) -> Result<WorkerMode, ConfigError> {
        let given = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
        let get_job_url = given(&a.get_job_url);
        if a.test_input.is_some() || get_job_url.is_none() {
            return Ok(WorkerMode::Local { test_input: a.test_input.clone() });
        }
        let get_job_url = get_job_url.unwrap_or_default();
        check_template("RUNPOD_WEBHOOK_GET_JOB", &get_job_url)?;
        let post_output_url = given(&a.post_output_url).ok_or_else(|| {
            bad("RUNPOD_WEBHOOK_POST_OUTPUT", "is required with RUNPOD_WEBHOOK_GET_JOB (the worker posts results to it)")
        })?;
        check_template("RUNPOD_WEBHOOK_POST_OUTPUT", &post_output_url)?;
        let ping_url = given(&a.ping_url);
        if let Some(p) = &ping_url {
            check_template("RUNPOD_WEBHOOK_PING", p)?;
        }
        if !(100..=3_600_000).contains(&a.ping_interval_ms) {
            return Err(bad("RUNPOD_PING_INTERVAL", format!("{} ms is not in 100..=3600000", a.ping_interval_ms)));
        }
        Ok(WorkerMode::RunPod(RunPodSettings {
            get_job_url,
            post_output_url,
            ping_url,
            ping_interval: Duration::from_millis(a.ping_interval_ms),
            pod_id: given(&a.pod_id),
            api_key: a.runpod_api_key.clone().unwrap_or_default().trim().to_string(),
        }))
    }
}

/// A control-plane URL template must be an http(s) URL once its placeholders are filled in.
fn check_template(name: &'static str, template: &str) -> Result<(), ConfigError> {
    let filled = template.replace("$RUNPOD_POD_ID", "pod").replace("$ID", "id");
    let url = url::Url::parse(&filled).map_err(|e| bad(name, format!("`{template}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(bad(name, format!("`{template}` is not an http(s) URL")));
    }
    Ok(())
}

/// `IMAGE_PATH_ROOT`: unset or empty = off; otherwise an existing directory, made canonical so that
/// every later containment check compares resolved paths.
fn image_path_root(root: Option<&std::path::Path>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(root) = root.filter(|r| !r.as_os_str().is_empty()) else { return Ok(None) };
    let canonical =
        root.canonicalize().map_err(|e| bad("IMAGE_PATH_ROOT", format!("`{}` cannot be resolved: {e}", root.display())))?;
    if !canonical.is_dir() {
        return Err(bad("IMAGE_PATH_ROOT", format!("`{}` is not a directory", root.display())));
    }
    Ok(Some(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct P {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(argv: &[&str]) -> Result<Settings, String> {
        let mut full = vec!["serve"];
        full.extend_from_slice(argv);
        let p = P::try_parse_from(full).map_err(|e| e.to_string())?;
        Settings::from_args(&p.args).map_err(|e| e.to_string())
    }

    #[test]
    fn builtin_defaults_match_the_documented_ones_and_the_flag_defaults() {
        let b = Settings::builtin();
        assert_eq!(b.addr.to_string(), "0.0.0.0:8000");
        assert_eq!((b.batch_size, b.batch_timeout.as_millis(), b.lightning_steps), (4, 40, 8));
        assert!(b.max_body_bytes >= (20 * 1024 * 1024 / 3 + 1) * 4, "must fit a 20 MiB image as base64");
        // The flag defaults (with none of the variables set) agree with `builtin`. The variables
        // could be set in the test's environment, so compare only what clap derived from defaults.
        let p = P::try_parse_from(["serve", "--host", "0.0.0.0", "--port", "8000", "--batch-size", "4"]).unwrap();
        let s = Settings::from_args(&p.args).unwrap();
        assert_eq!(s.addr, b.addr);
        assert_eq!(s.batch_size, b.batch_size);
    }

    #[test]
    fn flags_parse_and_are_validated() {
        let s =
            parse(&["--port", "0", "--batch-size", "2", "--lightning", "--allow-private-urls", "127.0.0.1,10.0.0.0/8"]).unwrap();
        assert_eq!(s.addr.port(), 0);
        assert_eq!(s.batch_size, 2);
        assert!(s.lightning);
        assert_eq!(s.private_urls, PrivateUrls::Allow(vec!["127.0.0.1/32".parse().unwrap(), "10.0.0.0/8".parse().unwrap()]));
        assert!(parse(&["--lightning", "false"]).map(|s| !s.lightning).unwrap_or(true));
        assert!(parse(&["--batch-size", "0"]).unwrap_err().contains("BATCH_SIZE"));
        assert!(parse(&["--max-queue", "0"]).unwrap_err().contains("MAX_QUEUE"));
        // MAX_N's default follows a small MAX_QUEUE; only an explicit MAX_N over it is refused.
        assert_eq!(parse(&["--max-queue", "3"]).unwrap().max_n, 3);
        assert_eq!(parse(&["--max-queue", "64"]).unwrap().max_n, DEFAULT_MAX_N);
        assert!(parse(&["--max-queue", "3", "--max-n", "4"]).unwrap_err().contains("MAX_N"));
        assert!(parse(&["--max-n", "0"]).unwrap_err().contains("MAX_N"));
        assert!(parse(&["--log-format", "xml"]).unwrap_err().contains("LOG_FORMAT"));
        assert!(parse(&["--precision", "int3"]).unwrap_err().contains("PRECISION_MODE"));
        assert_eq!(parse(&["--precision", "8bit"]).unwrap().precision.to_string(), "fp8");
        assert_eq!(parse(&["--precision", "BF16"]).unwrap().precision.to_string(), "bf16");
        assert!(parse(&["--request-timeout=-1"]).unwrap_err().contains("REQUEST_TIMEOUT"));
        assert!(parse(&["--allow-private-urls", "maybe"]).unwrap_err().contains("ALLOW_PRIVATE_URLS"));
        assert!(parse(&["--backend", "tpu"]).is_err());
        assert!(parse(&["--max-steps", "0"]).unwrap_err().contains("MAX_STEPS"));
        assert!(parse(&["--max-steps", "4", "--lightning-steps", "8"]).unwrap_err().contains("LIGHTNING_STEPS"));
        assert!(parse(&["--max-output-pixels", "10"]).unwrap_err().contains("MAX_OUTPUT_PIXELS"));
        assert!(parse(&["--memory-limit", "lots"]).unwrap_err().contains("MEMORY_LIMIT"));
        assert!(parse(&["--memory-limit", "1M"]).unwrap_err().contains("64 MiB"));
        assert!(parse(&["--memory-limit", "4G", "--request-memory", "4G"]).unwrap_err().contains("REQUEST_MEMORY"));
        let s = parse(&["--memory-limit", "6G", "--request-memory", "1500M", "--url-allowed-ports", "443, 8443"]).unwrap();
        assert_eq!((s.memory_limit, s.request_memory), (Some(6 << 30), Some(1500 << 20)));
        assert_eq!(s.url_allowed_ports, Some(vec![443, 8443]));
        assert_eq!(parse(&["--url-allowed-ports", "any"]).unwrap().url_allowed_ports, None);
        assert!(parse(&["--url-allowed-ports", "http"]).unwrap_err().contains("URL_ALLOWED_PORTS"));
        assert!(parse(&["--url-allowed-ports", ","]).unwrap_err().contains("URL_ALLOWED_PORTS"));
        assert!(parse(&["--watchdog-factor=-1"]).unwrap_err().contains("WATCHDOG_FACTOR"));
    }

    #[test]
    fn api_key_of_only_whitespace_is_refused_and_can_come_from_a_file() {
        assert!(parse(&["--api-key", "  "]).unwrap_err().contains("only whitespace"));
        assert!(parse(&["--api-key", "\t\n"]).unwrap_err().contains("only whitespace"));
        assert_eq!(parse(&["--api-key", ""]).unwrap().api_key, None, "empty = none");
        assert_eq!(parse(&["--api-key", " k3y "]).unwrap().api_key.as_deref(), Some("k3y"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "s3cret-from-file\n").unwrap();
        let f = file.to_str().unwrap();
        assert_eq!(parse(&["--api-key-file", f]).unwrap().api_key.as_deref(), Some("s3cret-from-file"));
        assert!(parse(&["--api-key-file", f, "--api-key", "other"]).unwrap_err().contains("one way"));
        std::fs::write(&file, " \n\t ").unwrap();
        assert!(parse(&["--api-key-file", f]).unwrap_err().contains("only whitespace"));
        let missing = dir.path().join("nope");
        assert!(parse(&["--api-key-file", missing.to_str().unwrap()]).unwrap_err().contains("cannot read"));
    }

    #[test]
    fn serve_only_settings() {
        let s = parse(&["--result-ttl", "60", "--result-memory-bytes", "1048576"]).unwrap();
        assert_eq!((s.result_ttl, s.result_memory_bytes), (Duration::from_secs(60), 1 << 20));
        assert!(parse(&["--result-memory-bytes", "100"]).unwrap_err().contains("RESULT_MEMORY_BYTES"));
        assert!(parse(&["--result-ttl", "0"]).unwrap_err().contains("RESULT_TTL"));
        assert_eq!(Settings::builtin().result_ttl, Duration::from_secs(1800), "RunPod keeps /run results 30 min");
    }

    #[test]
    fn image_path_root_must_be_a_directory_and_is_made_canonical() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let twisted = dir.path().join("in/../in");
        let s = parse(&["--image-path-root", twisted.to_str().unwrap()]).unwrap();
        assert_eq!(s.image_path_root, Some(dir.path().join("in").canonicalize().unwrap()));
        assert_eq!(image_path_root(Some(std::path::Path::new(""))).unwrap(), None, "empty = off");
        assert_eq!(Settings::builtin().image_path_root, None, "off by default");
        assert!(parse(&["--image-path-root", dir.path().join("f").to_str().unwrap()]).unwrap_err().contains("not a directory"));
        assert!(parse(&["--image-path-root", "/no/such/dir"]).unwrap_err().contains("IMAGE_PATH_ROOT"));
    }

    #[derive(clap::Parser)]
    struct W {
        #[command(flatten)]
        args: WorkerArgs,
    }

    fn worker(argv: &[&str]) -> Result<WorkerMode, String> {
        let mut full = vec!["worker"];
        full.extend_from_slice(argv);
        let w = W::try_parse_from(full).map_err(|e| e.to_string())?;
        WorkerMode::from_args(&w.args).map_err(|e| e.to_string())
    }

    #[test]
    fn worker_modes() {
        let take = "https://api.runpod.ai/v2/ep/job-take/$ID?gpu=x";
        let done = "https://api.runpod.ai/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=x";
        assert_eq!(worker(&["--get-job-url", ""]).unwrap(), WorkerMode::Local { test_input: None }, "no take URL: local");
        assert_eq!(
            worker(&["--get-job-url", take, "--test_input", "{}"]).unwrap(),
            WorkerMode::Local { test_input: Some("{}".into()) },
            "--test_input (the library's spelling) wins"
        );
        let WorkerMode::RunPod(rp) =
            worker(&["--get-job-url", take, "--post-output-url", done, "--pod-id", "p1", "--ping-interval-ms", "250"]).unwrap()
        else {
            panic!("not RunPod mode")
        };
        assert_eq!((rp.get_job_url.as_str(), rp.pod_id.as_deref()), (take, Some("p1")));
        assert_eq!(rp.ping_interval, Duration::from_millis(250));
        assert!(worker(&["--get-job-url", take]).unwrap_err().contains("RUNPOD_WEBHOOK_POST_OUTPUT"));
        assert!(worker(&["--get-job-url", "ftp://x/$ID", "--post-output-url", done])
            .unwrap_err()
            .contains("RUNPOD_WEBHOOK_GET_JOB"));
        assert!(worker(&["--get-job-url", take, "--post-output-url", done, "--ping-interval-ms", "5"])
            .unwrap_err()
            .contains("RUNPOD_PING_INTERVAL"));
    }

    #[test]
    fn private_url_settings() {
        assert_eq!("false".parse::<PrivateUrls>().unwrap(), PrivateUrls::Deny);
        assert_eq!("".parse::<PrivateUrls>().unwrap(), PrivateUrls::Deny);
        assert_eq!("TRUE".parse::<PrivateUrls>().unwrap(), PrivateUrls::AllowAll);
        assert_eq!("::1".parse::<PrivateUrls>().unwrap(), PrivateUrls::Allow(vec!["::1/128".parse().unwrap()]));
    }
}
