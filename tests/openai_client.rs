//! The official `openai` Python client (PyPI; `export/requirements.txt` pins it, `scripts/setup.sh`
//! installs it into .venv) against `POST /v1/images/edits`: tests/openai_client.py does the checks;
//! this starts the servers (the tiny Edit bundle with an API key, the tiny Edit Plus 2509 bundle; both
//! on loopback) and runs the script. `QWEN_EDIT_TEST_PYTHON` picks another interpreter.

mod server_support;

use std::process::Command;
use std::time::Duration;

use qwen_edit::server::Server;
use server_support::*;

async fn start(settings: qwen_edit::config::Settings) -> Server {
    let server = Server::start(settings).await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), server.ready()).await.unwrap().unwrap();
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_client_works_against_serve() {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = std::env::var("QWEN_EDIT_TEST_PYTHON").unwrap_or_else(|_| format!("{root}/.venv/bin/python"));
    let probe = Command::new(&python).args(["-c", "import openai"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "{python} cannot import openai ({probe:?}): run scripts/setup.sh all (export/requirements.txt pins openai)"
    );
    let edit = start(qwen_edit::config::Settings { api_key: Some("client-key".into()), ..settings() }).await;
    let plus_bundle = format!("{root}/engines/tiny-2509");
    let plus = start(qwen_edit::config::Settings { bundle: plus_bundle.into(), ..settings() }).await;
    let (base, plus_base) = (format!("http://{}", edit.addr()), format!("http://{}", plus.addr()));
    let script = format!("{root}/tests/openai_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args([script.as_str(), "--base", &base, "--key", "client-key", "--plus", &plus_base])
            .env("HOME", std::env::temp_dir())
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .output()
    })
    .await
    .unwrap()
    .expect("run the client script");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client script failed ({}):\n{stdout}\n{stderr}", out.status);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON summary");
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["openai"], "3.57.0", "the pinned client");
    eprintln!("{stdout}");
    for s in [edit, plus] {
        s.shutdown();
        s.wait().await.unwrap();
    }
}
