//! The worker's local test mode, like the Python library's: one job from `--test-input '<json>'` or
//! ./test_input.json, run through the service, its result body printed on stdout as one JSON line.

use bytes::Bytes;

use super::protocol::result_body;
use crate::service::jobs::run_job;
use crate::service::EditService;

/// Where the job comes from: the flag's text, or ./test_input.json.
pub fn read_job(test_input: Option<String>) -> Result<String, String> {
    if let Some(text) = test_input {
        tracing::info!("test_input set, using test_input as job input");
        return Ok(text);
    }
    let path = std::env::current_dir().map(|d| d.join("test_input.json")).unwrap_or_else(|_| "test_input.json".into());
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            tracing::info!("using {} as job input", path.display());
            Ok(text)
        }
        Err(e) => Err(format!(
            "{} not found ({e}); pass --test-input '{{\"input\": {{...}}}}', or set RUNPOD_WEBHOOK_GET_JOB to take jobs from RunPod",
            path.display()
        )),
    }
}

/// Checks the job (a JSON object with a non-null `input`) and returns its id (`local_test` by default).
pub fn job_id(text: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("the test input is not JSON: {e}"))?;
    if v.get("input").is_none_or(serde_json::Value::is_null) {
        return Err("the job has no \"input\"; unable to run (send {\"input\": {...}})".into());
    }
    Ok(v.get("id").and_then(|i| i.as_str()).unwrap_or("local_test").to_string())
}

/// The job to run (read and checked before the model loads): its text and id.
pub fn job(test_input: Option<String>) -> Result<(String, String), String> {
    let text = read_job(test_input)?;
    let id = job_id(&text)?;
    Ok((text, id))
}

/// Runs the one job; 0 when it succeeded, 1 otherwise.
pub async fn run(service: &EditService, text: String, id: String) -> u8 {
    let result = run_job(service, Bytes::from(text)).await;
    println!("{}", String::from_utf8_lossy(&result_body(&result)));
    match result {
        Ok(_) => {
            tracing::info!(job = %id, "job completed successfully; local testing complete");
            0
        }
        Err(e) => {
            tracing::error!(job = %id, "job failed: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_need_an_input() {
        assert_eq!(job_id(r#"{"input": {"prompt": "x"}}"#).unwrap(), "local_test");
        assert_eq!(job_id(r#"{"id": "j9", "input": {}}"#).unwrap(), "j9");
        assert!(job_id(r#"{"input": null}"#).unwrap_err().contains("no \"input\""));
        assert!(job_id(r#"{"prompt": "x"}"#).is_err());
        assert!(job_id("nope").unwrap_err().contains("not JSON"));
        assert_eq!(read_job(Some("{}".into())).unwrap(), "{}");
    }
}
