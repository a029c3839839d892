//! Issue 21's check, too heavy for `make test` (its own target: `make memory-check`): a bundle
//! exported at the real image area (1 MP) from the committed 2509 tiny checkpoint, eight concurrent
//! 1024x1024 requests under BATCH_SIZE=4 with a MEMORY_LIMIT that admits fewer than four jobs per
//! batch. All complete, no batch is larger than what the server says fits, and its peak resident
//! memory stays under MEMORY_LIMIT.
//!
//! The limit is found by a first start (MEMORY_LIMIT 16G): the loaded model, REQUEST_MEMORY (1G) and
//! room for two and a half of the jobs the server itself estimates, so the cap, not BATCH_SIZE,
//! decides the batches. `QWEN_EDIT_MEMORY_CHECK_LIMIT` sets MEMORY_LIMIT instead (no first start);
//! `QWEN_EDIT_MEMORY_CHECK_BUNDLE` reuses an exported bundle instead of exporting one (about 2
//! minutes). The whole check takes 5-10 minutes on 2 cores.

mod server_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use server_support::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The 1 MP bundle: the one named by the environment, or a fresh export into `tmp`.
fn bundle(tmp: &std::path::Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("QWEN_EDIT_MEMORY_CHECK_BUNDLE") {
        return PathBuf::from(dir);
    }
    let out = tmp.join("edit-2509-1mp");
    let python = root().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run `scripts/setup.sh all`", python.display());
    let t = Instant::now();
    let status = std::process::Command::new(python)
        .current_dir(root())
        .args(["-m", "export", "bundle", "--checkpoint", "engines/tiny-checkpoints/edit-2509", "--out"])
        .arg(&out)
        .status()
        .expect("run the export tool");
    assert!(status.success(), "the export failed: {status}");
    eprintln!("exported the 1 MP bundle in {:.0} s", t.elapsed().as_secs_f64());
    out
}

/// A 1024x1024 photo-like picture (noise, so that the PNG is not trivially small).
fn photo(seed: u32) -> Vec<u8> {
    let mut state = 0x9e37_79b9u32 ^ seed;
    let img = qwen_edit::imaging::RgbImage::from_fn(1024, 1024, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = state % 32;
        image::Rgb([((x / 4 + n) % 256) as u8, ((y / 4 + n) % 256) as u8, (((x + y) / 8 + seed * 40) % 256) as u8])
    });
    png(&img)
}

/// Serves `dir` under BATCH_SIZE=4 and MEMORY_LIMIT `limit` (REQUEST_MEMORY 1G); returns the
/// process and what /health says fits at 1024x1024, with its memory plan.
async fn serve(dir: &std::path::Path, limit: &str) -> (Proc, serde_json::Value, serde_json::Value) {
    let t = Instant::now();
    let p = spawn_within(
        &[
            ("QWEN_EDIT_BUNDLE", dir.to_str().unwrap()),
            ("BATCH_SIZE", "4"),
            ("BATCH_TIMEOUT_MS", "3000"),
            ("BATCH_POLICY", "fixed"),
            ("MEMORY_LIMIT", limit),
            ("REQUEST_MEMORY", "1G"),
            ("REQUEST_TIMEOUT", "3600"),
        ],
        Duration::from_secs(900),
    )
    .await;
    eprintln!("MEMORY_LIMIT {limit}: loaded and probed in {:.0} s", t.elapsed().as_secs_f64());
    let memory = get(p.addr, "/health").await.json()["memory"].clone();
    eprintln!("/health memory: {}", serde_json::to_string_pretty(&memory).unwrap());
    let fit = memory["resolutions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["width"] == 1024 && f["height"] == 1024)
        .cloned()
        .expect("/health reports 1024x1024");
    (p, fit, memory["plan"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "heavy: exports a 1 MP bundle and runs eight 1 MP edits; `make memory-check` runs it"]
async fn eight_concurrent_1mp_requests_under_batch_size_4_stay_under_memory_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = bundle(tmp.path());
    let limit = match std::env::var("QWEN_EDIT_MEMORY_CHECK_LIMIT") {
        Ok(l) => l,
        Err(_) => {
            let (p, fit, plan) = serve(&dir, "16G").await;
            drop(p);
            let job = fit["job_bytes"].as_u64().unwrap();
            assert!(fit["max_batch"] == 4 && job > 0, "with 16G four 1 MP jobs fit: {fit}");
            let bytes = plan["model"].as_u64().unwrap() + (1 << 30) + job * 5 / 2;
            bytes.to_string()
        }
    };
    let limit_bytes = qwen_edit::sysmem::parse_bytes(&limit).expect("a size");
    let (p, fit, _) = serve(&dir, &limit).await;
    let max_batch = fit["max_batch"].as_u64().unwrap() as usize;
    assert!((1..4).contains(&max_batch), "MEMORY_LIMIT {limit} caps the batch below BATCH_SIZE: {fit}");

    let bodies: Vec<String> =
        (0..8u32).map(|i| edit_body(&format!("edit {i}: make it brighter"), u64::from(i) + 1, 2, &b64(&photo(i)))).collect();
    let start = Instant::now();
    let tasks: Vec<_> = bodies.into_iter().map(|b| tokio::spawn(post_json(p.addr, b))).collect();
    let mut sizes = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}\n{}", r.text(), p.log());
        let v = r.json();
        assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(1024), Some(1024)));
        sizes.push(v["timings"]["batch_size"].as_u64().unwrap() as usize);
    }
    let took = start.elapsed();
    let peak = p.peak_rss_kib() * 1024;
    eprintln!(
        "eight 1 MP requests in {:.0} s, batch sizes {sizes:?} (largest that fits: {max_batch}); peak RSS {:.2} GiB, MEMORY_LIMIT {limit} ({:.2} GiB)",
        took.as_secs_f64(),
        peak as f64 / (1u64 << 30) as f64,
        limit_bytes as f64 / (1u64 << 30) as f64
    );
    assert!(sizes.iter().all(|&n| n <= max_batch), "a batch over the cap: {sizes:?}");
    assert!(sizes.contains(&max_batch), "the queue filled batches up to the cap: {sizes:?}");
    assert!(peak < limit_bytes, "peak RSS {peak} bytes over MEMORY_LIMIT {limit_bytes}");
}
