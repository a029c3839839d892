//! The official `runpod` Python client (PyPI; `export/requirements.txt` pins it, `scripts/setup.sh`
//! installs it into .venv) against `qwen-edit serve`'s /v2 layout: tests/runpod_client.py does the
//! checks; this starts the server (tiny bundle, loopback, an API key) and runs the script.
//! `QWEN_EDIT_TEST_PYTHON` picks another interpreter.

mod server_support;

use std::process::Command;
use std::time::Duration;

use qwen_edit::server::Server;
use server_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_runpod_client_works_against_serve() {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = std::env::var("QWEN_EDIT_TEST_PYTHON").unwrap_or_else(|_| format!("{root}/.venv/bin/python"));
    let probe = Command::new(&python).args(["-c", "import runpod"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "{python} cannot import runpod ({probe:?}): run scripts/setup.sh all (export/requirements.txt pins runpod)"
    );
    let settings = qwen_edit::config::Settings { batch_size: 1, api_key: Some("client-key".into()), ..settings() };
    let server = Server::start(settings).await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), server.ready()).await.unwrap().unwrap();
    let base = format!("http://{}", server.addr());
    let script = format!("{root}/tests/runpod_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args([script.as_str(), "--base", &base, "--key", "client-key"])
            .env("HOME", std::env::temp_dir())
            .output()
    })
    .await
    .unwrap()
    .expect("run the client script");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the runpod client script failed ({}):\n{stdout}\n{stderr}", out.status);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON summary");
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["runpod"], "1.12.0", "the pinned client");
    eprintln!("{stdout}");
    server.shutdown();
    server.wait().await.unwrap();
}
