//! Load bench: drives the real `qwen-edit serve` (tiny bundle, CPU, loopback) at fixed arrival rates
//! for every BATCH_SIZE x BATCH_TIMEOUT_MS under `BATCH_POLICY=fixed`, and under `adaptive` for
//! every BATCH_SIZE at the timeouts of `LOAD_ADAPTIVE_TIMEOUTS_MS` (default `40,100`: for it the
//! timeout is only the longest wait), and prints throughput, latency, batch size and 503 share.
//!
//! `cargo bench --bench load` (about 25 minutes on 2 cores). Open loop: request i is sent at
//! t0 + i/rate whatever the server does, and its latency counts from that moment, so a slow server
//! cannot slow the client down and hide its queueing (no coordinated omission). Every configuration
//! gets a fresh server process, two warm-up requests, then `LOAD_SECONDS` (default 6) of arrivals.
//! The rates are multiples of the measured capacity of BATCH_SIZE=1 on this machine (calibrated
//! first; `LOAD_RATE_FACTORS`, default `0.5,2`), or absolute with `LOAD_RATES` (requests/s).
//! Other knobs: `LOAD_STEPS` (denoising steps per request, default 8), `LOAD_BATCH_SIZES`,
//! `LOAD_TIMEOUTS_MS`, `LOAD_REPEATS` (runs per row, default 3: each figure is the median of the
//! runs, of an even number the lower middle one; the 503 share their total, so one noisy run does
//! not decide a row). The table goes to stdout and to target/bench-tables/load.md.
//! Under `cargo test` (no `--bench`) it runs one short configuration as a smoke test.

#[path = "../tests/server_support/mod.rs"]
mod server_support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use server_support::*;

struct Config {
    rate: f64,
    policy: &'static str,
    batch_size: usize,
    timeout_ms: u64,
    seconds: f64,
    steps: u32,
}

struct Outcome {
    sent: usize,
    ok: usize,
    rejected: usize,
    failed: usize,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    avg_batch: f64,
}

fn env_list<T: std::str::FromStr + Clone>(name: &str, default: &[T]) -> Vec<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.split(',').map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{name}: `{s}` is not a number"))).collect()
        }
        _ => default.to_vec(),
    }
}

/// A request body: a 256x192 PNG (the tiny bundle edits at 128x128 whatever the input), its own
/// prompt and seed.
fn body(i: usize, steps: u32) -> String {
    edit_body(&format!("load request {i}: make it brighter"), i as u64, steps, &b64(&png(&picture(256, 192, i as u32))))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn batch_totals(p: &Proc) -> (f64, f64) {
    let t = get(p.addr, "/metrics").await.text();
    (metric(&t, "qwen_edit_batch_size_sum"), metric(&t, "qwen_edit_batch_size_count"))
}

async fn start(batch_size: usize, timeout_ms: u64, policy: &str, steps: u32) -> Proc {
    let p = spawn(&[
        ("BATCH_SIZE", &batch_size.to_string()),
        ("BATCH_TIMEOUT_MS", &timeout_ms.to_string()),
        ("BATCH_POLICY", policy),
        ("REQUEST_TIMEOUT", "600"),
    ])
    .await;
    for i in 0..2 {
        let r = post_json(p.addr, body(1_000_000 + i, steps)).await;
        assert_eq!(r.status, 200, "warm-up: {}\n{}", r.text(), p.log());
    }
    p
}

/// Mean seconds per request of BATCH_SIZE=1, one request at a time (the unit the rates scale).
async fn calibrate(steps: u32) -> f64 {
    let p = start(1, 0, "fixed", steps).await;
    let n = 8;
    let t = Instant::now();
    for i in 0..n {
        let r = post_json(p.addr, body(i, steps)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    t.elapsed().as_secs_f64() / n as f64
}

async fn run(c: &Config) -> Outcome {
    let p = start(c.batch_size, c.timeout_ms, c.policy, c.steps).await;
    let (sum0, count0) = batch_totals(&p).await;
    let n = (c.rate * c.seconds).round().max(1.0) as usize;
    let bodies: Vec<String> = (0..n).map(|i| body(i, c.steps)).collect();
    let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let at = t0 + Duration::from_secs_f64(i as f64 / c.rate);
            let addr = p.addr;
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let r = post_json(addr, b).await;
                (r.status, at.elapsed().as_secs_f64(), tokio::time::Instant::now())
            })
        })
        .collect();
    let (mut ok, mut rejected, mut failed) = (0, 0, 0);
    let mut latencies = Vec::new();
    let mut last = t0;
    for t in tasks {
        let (status, latency, done) = t.await.expect("client task");
        match status {
            200 => {
                ok += 1;
                latencies.push(latency * 1e3);
                last = last.max(done);
            }
            503 => rejected += 1,
            _ => failed += 1,
        }
    }
    let (sum1, count1) = batch_totals(&p).await;
    latencies.sort_by(f64::total_cmp);
    let span = last.saturating_duration_since(t0).as_secs_f64();
    Outcome {
        sent: n,
        ok,
        rejected,
        failed,
        throughput: if span > 0.0 { ok as f64 / span } else { 0.0 },
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        avg_batch: if count1 > count0 { (sum1 - sum0) / (count1 - count0) } else { 0.0 },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[(v.len() - 1) / 2]
    }
}

/// One row from several runs of a configuration: medians of the figures, totals of the counts.
fn combine(runs: &[Outcome]) -> Outcome {
    let m = |f: fn(&Outcome) -> f64| median(runs.iter().map(f).collect());
    Outcome {
        sent: runs.iter().map(|o| o.sent).sum(),
        ok: runs.iter().map(|o| o.ok).sum(),
        rejected: runs.iter().map(|o| o.rejected).sum(),
        failed: runs.iter().map(|o| o.failed).sum(),
        throughput: m(|o| o.throughput),
        p50_ms: m(|o| o.p50_ms),
        p99_ms: m(|o| o.p99_ms),
        avg_batch: m(|o| o.avg_batch),
    }
}

fn row(c: &Config, o: &Outcome) -> String {
    format!(
        "| {:.1} | {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0}% |{}",
        c.rate,
        c.batch_size,
        c.timeout_ms,
        c.policy,
        o.throughput,
        o.p50_ms,
        o.p99_ms,
        o.avg_batch,
        100.0 * o.rejected as f64 / o.sent as f64,
        if o.failed > 0 { format!(" {} failed", o.failed) } else { String::new() }
    )
}

async fn bench() {
    let steps: u32 = env_list("LOAD_STEPS", &[8])[0];
    let seconds: f64 = env_list("LOAD_SECONDS", &[6.0])[0];
    let repeats: usize = env_list("LOAD_REPEATS", &[3])[0].max(1);
    let sizes: Vec<usize> = env_list("LOAD_BATCH_SIZES", &[1, 2, 4, 8]);
    let timeouts: Vec<u64> = env_list("LOAD_TIMEOUTS_MS", &[0, 10, 40, 100]);
    let adaptive_timeouts: Vec<u64> = env_list("LOAD_ADAPTIVE_TIMEOUTS_MS", &[40, 100]);
    let per_request = calibrate(steps).await;
    let rates: Vec<f64> = match std::env::var("LOAD_RATES") {
        Ok(v) if !v.trim().is_empty() => env_list("LOAD_RATES", &[]),
        _ => env_list("LOAD_RATE_FACTORS", &[0.5, 2.0]).into_iter().map(|f: f64| f / per_request).collect(),
    };
    let mut table = format!(
        "Tiny bundle, {steps} steps, one 256x192 PNG per request (edited at 128x128), {seconds} s of arrivals per run, \
         {repeats} runs per row (each figure the median of the runs, of two the lower; the 503 share over all), MAX_QUEUE 64. \
         Arrival rates are multiples of the rate of one client sending one request after another to \
         BATCH_SIZE=1 ({:.1} ms per request, {:.2} requests/s); under concurrency the server overlaps decoding and \
         encoding with the model, so it can serve more than that.\n\n\
         | arrivals/s | BATCH_SIZE | BATCH_TIMEOUT_MS | BATCH_POLICY | throughput/s | p50 ms | p99 ms | avg batch | 503 |\n\
         | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n",
        per_request * 1e3,
        1.0 / per_request
    );
    for &rate in &rates {
        for &batch_size in &sizes {
            let fixed = timeouts.iter().map(|&t| ("fixed", t));
            for (policy, timeout_ms) in fixed.chain(adaptive_timeouts.iter().map(|&t| ("adaptive", t))) {
                let c = Config { rate, policy, batch_size, timeout_ms, seconds, steps };
                let mut runs = Vec::new();
                for _ in 0..repeats {
                    runs.push(run(&c).await);
                }
                let line = row(&c, &combine(&runs));
                eprintln!("{line}");
                writeln!(table, "{line}").unwrap();
            }
        }
    }
    print!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tables");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("load.md"), &table).unwrap();
}

/// `cargo test`: one short configuration; every request must succeed and batches must form.
async fn smoke() {
    let c = Config { rate: 40.0, policy: "fixed", batch_size: 4, timeout_ms: 100, seconds: 1.0, steps: 2 };
    let o = run(&c).await;
    eprintln!("{}", row(&c, &o));
    assert_eq!((o.ok, o.failed), (o.sent, 0), "every request of the smoke run must succeed");
    assert!(o.avg_batch > 1.0, "40 arrivals/s with a 100 ms window must batch: {}", o.avg_batch);
    assert!(o.p50_ms > 0.0 && o.p99_ms >= o.p50_ms);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if std::env::args().any(|a| a == "--bench") {
        rt.block_on(bench());
    } else {
        rt.block_on(smoke());
    }
}
