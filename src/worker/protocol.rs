//! RunPod's worker protocol as the official `runpod` Python library (1.12.0) speaks it: the URLs it
//! builds, the job-take and job-stop replies it accepts and the result bodies it posts. Pure.
//!
//! - take: `RUNPOD_WEBHOOK_GET_JOB` with `$ID` = the pod id, `&job_in_progress=0|1`; for more than
//!   one free place `/job-take/` becomes `/job-take-batch/` with `&batch_size=N`. 204 and 400 mean no
//!   job, 429 back off; a 200 `application/json` body is one job object or a list of them.
//! - stop: the take URL with `/job-take/` -> `/job-stop/` (no `job_in_progress`), answering
//!   `{"jobsToStop": [ids]}`; no `/job-take/` in the URL, no job-stop.
//! - result: `RUNPOD_WEBHOOK_POST_OUTPUT` with `$RUNPOD_POD_ID` and `$ID` filled in, `&isStream=false`;
//!   `{"output": <the /run response>}` or `{"error": <failure_text>}`.
//! - heartbeat: `RUNPOD_WEBHOOK_PING` with `$RUNPOD_POD_ID`, `job_id=<ids, comma-joined>` (left out
//!   with no job) and `runpod_version`.
//!
//! The library appends parameters with a literal `&` (RunPod's URLs carry a `?`); here a URL without
//! a query gets `?` instead.

use bytes::Bytes;

use crate::config::RunPodSettings;
use crate::service::jobs::failure_text;
use crate::service::schema::EditResponse;
use crate::service::ApiError;

/// The `runpod` library version whose protocol this follows (sent as `runpod_version`).
pub const PROTOCOL_VERSION: &str = "1.12.0";

/// A job taken: its id and its whole object (`{"id", "input", ...}`), which is the edit service's
/// request body as it is (keys beside `input` are ignored there).
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: String,
    pub body: Bytes,
}

/// What a job-take reply means.
#[derive(Debug, PartialEq)]
pub enum Take {
    /// Jobs to run, and the entries that could not be jobs (logged; nothing can be posted for them).
    Jobs(Vec<Job>, Vec<String>),
    NoJob,
    /// 429: wait before asking again.
    Throttled,
    Failed(String),
}

/// What a job-stop reply means.
#[derive(Debug, PartialEq)]
pub enum Stop {
    Ids(Vec<String>),
    Throttled,
    Failed(String),
}

/// The control-plane URLs of one worker.
#[derive(Clone, Debug)]
pub struct Urls {
    take: String,
    output: String,
    ping: Option<String>,
}

fn append(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Urls {
    pub fn new(s: &RunPodSettings, pod_id: &str) -> Urls {
        Urls {
            take: s.get_job_url.replace("$ID", pod_id),
            output: s.post_output_url.replace("$RUNPOD_POD_ID", pod_id),
            ping: s.ping_url.as_ref().map(|p| p.replace("$RUNPOD_POD_ID", pod_id)),
        }
    }

    /// The take URL for `free` places (a batch take when more than one), `busy` when jobs are in progress.
    pub fn take(&self, free: usize, busy: bool) -> String {
        let url = if free > 1 {
            append(&self.take.replace("/job-take/", "/job-take-batch/"), &format!("batch_size={free}"))
        } else {
            self.take.clone()
        };
        append(&url, if busy { "job_in_progress=1" } else { "job_in_progress=0" })
    }

    pub fn stop(&self) -> Option<String> {
        self.take.contains("/job-take/").then(|| self.take.replace("/job-take/", "/job-stop/"))
    }

    pub fn output(&self, job_id: &str) -> String {
        append(&self.output.replace("$ID", job_id), "isStream=false")
    }

    /// The heartbeat URL listing the jobs in progress.
    pub fn ping(&self, ids: &[String]) -> Option<String> {
        let mut url = self.ping.clone()?;
        if !ids.is_empty() {
            url = append(&url, &format!("job_id={}", encode(&ids.join(","))));
        }
        Some(append(&url, &format!("runpod_version={PROTOCOL_VERSION}")))
    }

    /// The one ping the library sends when the worker cannot start (then it exits).
    pub fn unhealthy(&self, check: &str, reason: &str) -> Option<String> {
        let reason: String = reason.chars().take(256).collect();
        let url = append(self.ping.as_ref()?, "status=unhealthy");
        let url = append(&url, &format!("check={}&reason={}", encode(check), encode(&reason)));
        Some(append(&url, &format!("runpod_version={PROTOCOL_VERSION}")))
    }
}

fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a job-take reply.
pub fn parse_take(status: u16, content_type: &str, body: &[u8]) -> Take {
    match status {
        204 | 400 => return Take::NoJob,
        429 => return Take::Throttled,
        200..=299 => {}
        s => return Take::Failed(format!("job take answered {s}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]))),
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Take::NoJob;
    }
    if !is_json(content_type) {
        return Take::Failed(format!("job take answered {status} with `{content_type}`, not application/json"));
    }
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Take::Failed(format!("job take answered invalid JSON: {e}")),
    };
    let (items, single) = match value {
        serde_json::Value::Array(items) => (items, false),
        v @ serde_json::Value::Object(_) => (vec![v], true),
        other => return Take::Failed(format!("job take answered JSON that is neither a job nor a list: {other}")),
    };
    let mut jobs = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for item in items {
        let id = item.get("id").and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_string);
        match id {
            // A single job needs an input too (the library's rule); a batch entry's input is the service's to check.
            Some(_) if single && item.get("input").is_none() => problems.push("a job without \"input\"".to_string()),
            Some(id) => match serde_json::to_vec(&item) {
                Ok(body) => jobs.push(Job { id, body: Bytes::from(body) }),
                Err(e) => problems.push(format!("job {id}: {e}")),
            },
            None => problems.push(format!("an entry without a string \"id\": {}", clip(&item.to_string()))),
        }
    }
    if jobs.is_empty() && problems.is_empty() {
        Take::NoJob
    } else {
        Take::Jobs(jobs, problems)
    }
}

/// Reads a job-stop reply.
pub fn parse_stop(status: u16, content_type: &str, body: &[u8]) -> Stop {
    match status {
        204 => return Stop::Ids(Vec::new()),
        429 => return Stop::Throttled,
        200..=299 => {}
        s => return Stop::Failed(format!("job stop answered {s}")),
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Stop::Ids(Vec::new());
    }
    if !is_json(content_type) {
        return Stop::Failed(format!("job stop answered `{content_type}`, not application/json"));
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => Stop::Ids(
            v.get("jobsToStop")
                .and_then(|l| l.as_array())
                .map(|l| l.iter().filter_map(|i| i.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
        ),
        Err(e) => Stop::Failed(format!("job stop answered invalid JSON: {e}")),
    }
}

/// The body posted for a job's result: `{"output": <the /run response>}` or `{"error": <failure_text>}`.
pub fn result_body(result: &Result<EditResponse, ApiError>) -> Bytes {
    match result {
        Ok(r) => {
            let output = r.to_json();
            let mut out = Vec::with_capacity(output.len() + 12);
            out.extend_from_slice(b"{\"output\":");
            out.extend_from_slice(&output);
            out.push(b'}');
            Bytes::from(out)
        }
        Err(e) => Bytes::from(serde_json::json!({"error": failure_text(e)}).to_string()),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn urls(take: &str) -> Urls {
        Urls::new(
            &RunPodSettings {
                get_job_url: take.into(),
                post_output_url: "https://api.runpod.ai/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=A100".into(),
                ping_url: Some("https://api.runpod.ai/v2/ep/ping/$RUNPOD_POD_ID?gpu=A100".into()),
                ping_interval: Duration::from_secs(10),
                pod_id: Some("pod7".into()),
                api_key: "k".into(),
            },
            "pod7",
        )
    }

    #[test]
    fn urls_as_the_python_library_builds_them() {
        let u = urls("https://api.runpod.ai/v2/ep/job-take/$ID?gpu=A100");
        assert_eq!(u.take(1, false), "https://api.runpod.ai/v2/ep/job-take/pod7?gpu=A100&job_in_progress=0");
        assert_eq!(u.take(3, true), "https://api.runpod.ai/v2/ep/job-take-batch/pod7?gpu=A100&batch_size=3&job_in_progress=1");
        assert_eq!(u.stop().unwrap(), "https://api.runpod.ai/v2/ep/job-stop/pod7?gpu=A100");
        assert_eq!(u.output("job-1"), "https://api.runpod.ai/v2/ep/job-done/pod7/job-1?gpu=A100&isStream=false");
        assert_eq!(u.ping(&[]).unwrap(), "https://api.runpod.ai/v2/ep/ping/pod7?gpu=A100&runpod_version=1.12.0");
        assert_eq!(
            u.ping(&["a".into(), "b c".into()]).unwrap(),
            "https://api.runpod.ai/v2/ep/ping/pod7?gpu=A100&job_id=a%2Cb+c&runpod_version=1.12.0"
        );
        assert!(u
            .unhealthy("model", "no bundle")
            .unwrap()
            .contains("status=unhealthy&check=model&reason=no+bundle&runpod_version="));
        // Without a query, `?` starts one; without /job-take/, no job-stop.
        let bare = urls("http://cp/take/$ID");
        assert_eq!(bare.take(1, false), "http://cp/take/pod7?job_in_progress=0");
        assert_eq!(bare.stop(), None);
    }

    #[test]
    fn take_replies() {
        assert_eq!(parse_take(204, "", b""), Take::NoJob);
        assert_eq!(parse_take(400, "application/json", b"{}"), Take::NoJob, "FlashBoot's 400 is no job");
        assert_eq!(parse_take(429, "", b""), Take::Throttled);
        assert!(matches!(parse_take(500, "", b"down"), Take::Failed(m) if m.contains("500")));
        assert_eq!(parse_take(200, "application/json", b""), Take::NoJob);
        assert_eq!(parse_take(200, "application/json", b"[]"), Take::NoJob);
        assert!(matches!(parse_take(200, "text/html", b"<html>"), Take::Failed(_)));
        assert!(matches!(parse_take(200, "application/json", b"{"), Take::Failed(_)));

        let one =
            parse_take(200, "application/json; charset=utf-8", br#"{"id": "j1", "input": {"prompt": "p"}, "webhook": null}"#);
        let Take::Jobs(jobs, problems) = one else { panic!("{one:?}") };
        assert!(problems.is_empty());
        assert_eq!(jobs[0].id, "j1");
        let v: serde_json::Value = serde_json::from_slice(&jobs[0].body).unwrap();
        assert_eq!(v["input"]["prompt"], "p");

        let single_without_input = parse_take(200, "application/json", br#"{"id": "j1"}"#);
        assert!(matches!(single_without_input, Take::Jobs(j, p) if j.is_empty() && p.len() == 1));

        let batch = parse_take(200, "application/json", br#"[{"id": "a", "input": {}}, {"input": {}}, {"id": 5}, {"id": "b"}]"#);
        let Take::Jobs(jobs, problems) = batch else { panic!() };
        assert_eq!(jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["a", "b"], "b gets an error result from the service");
        assert_eq!(problems.len(), 2);
    }

    #[test]
    fn stop_replies() {
        assert_eq!(parse_stop(204, "", b""), Stop::Ids(vec![]));
        assert_eq!(parse_stop(429, "", b""), Stop::Throttled);
        assert_eq!(
            parse_stop(200, "application/json", br#"{"jobsToStop": ["a", 3, "b"]}"#),
            Stop::Ids(vec!["a".into(), "b".into()])
        );
        assert_eq!(parse_stop(200, "application/json", br#"{}"#), Stop::Ids(vec![]));
        assert!(matches!(parse_stop(503, "", b""), Stop::Failed(_)));
    }

    #[test]
    fn result_bodies() {
        let e = ApiError::validation("input.prompt is required");
        let v: serde_json::Value = serde_json::from_slice(&result_body(&Err(e))).unwrap();
        let inner: serde_json::Value = serde_json::from_str(v["error"].as_str().unwrap()).unwrap();
        assert_eq!(inner["error_type"], "validation_error");
        assert_eq!(inner["error_message"], "input.prompt is required");
        assert_eq!(v.as_object().unwrap().len(), 1);
    }
}
