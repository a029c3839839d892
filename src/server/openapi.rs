//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, built once. Request and response
//! bodies of the edit routes are generated from their Rust types (schemars, JSON Schema 2020-12, the
//! dialect of OpenAPI 3.1); the JSON built in place (health, /v2 records) is checked against the
//! live server's answers by `tests/openai_api.rs` (`the_openapi_document_is_valid_and_matches_the_server`),
//! which also checks that the routes match the server's.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use super::openai::{EditForm, ImagesResponse, OpenAiErrorBody};
use super::wire::Body;
use crate::service::schema::{EditResponse, Envelope};

/// The RunPod-style error body `{"error", "error_type"}`.
#[derive(serde::Serialize, JsonSchema)]
pub struct ErrorBody {
    /// What went wrong and how to fix it.
    pub error: String,
    /// A stable code (docs/server.md, "Errors").
    pub error_type: String,
}

/// The document's paths, as `(method, path)` (`{name}` marks a path parameter).
pub fn routes() -> Vec<(String, String)> {
    let doc = document();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in item.as_object().into_iter().flat_map(|m| m.keys()) {
            if method != "parameters" {
                out.push((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// The response of `GET /openapi.json`.
pub fn response() -> Response<Body> {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    let body = DOC.get_or_init(|| Bytes::from(serde_json::to_vec(document()).unwrap_or_default())).clone();
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The OpenAPI 3.1 document.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

fn build() -> Value {
    let mut generator =
        SchemaSettings::draft2020_12().with(|s| s.definitions_path = "/components/schemas".into()).into_generator();
    let mut refs = Map::new();
    refs.insert("RunRequest".into(), generator.subschema_for::<Envelope>().to_value());
    refs.insert("EditResponse".into(), generator.subschema_for::<EditResponse>().to_value());
    refs.insert("ImageEditRequest".into(), generator.subschema_for::<EditForm>().to_value());
    refs.insert("ImagesResponse".into(), generator.subschema_for::<ImagesResponse>().to_value());
    refs.insert("OpenAiError".into(), generator.subschema_for::<OpenAiErrorBody>().to_value());
    refs.insert("Error".into(), generator.subschema_for::<ErrorBody>().to_value());
    let mut schemas = generator.take_definitions(true);
    patch_generated(&mut schemas);
    for (name, schema) in hand_schemas() {
        schemas.insert(name.into(), schema);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "qwen-edit",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Qwen-Image-Edit inference server: RunPod-style /run and /runsync, RunPod's hosted /v2 layout, \
                            OpenAI's POST /v1/images/edits, health, metrics. See docs/server.md.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API_KEY, when the server has one"},
            },
        },
        "paths": paths(&refs),
    })
}

/// What the derives cannot say: `/run`'s `image` is written by hand (`EditResponse::to_json`), and
/// the form's image list is also sent as `image[]`.
fn patch_generated(schemas: &mut Map<String, Value>) {
    if let Some(Value::Object(r)) = schemas.get_mut("EditResponse") {
        if let Some(Value::Object(p)) = r.get_mut("properties") {
            p.insert(
                "image".into(),
                json!({"type": "string", "description": "The result image file, standard base64 (no data-URI prefix)."}),
            );
        }
        if let Some(Value::Array(req)) = r.get_mut("required") {
            req.push("image".into());
        }
    }
    if let Some(Value::Object(f)) = schemas.get_mut("ImageEditRequest") {
        if let Some(Value::Object(p)) = f.get_mut("properties") {
            if let Some(image) = p.get("image").cloned() {
                let mut list = image;
                list["description"] = "The SDKs' list form of `image` (repeated); merged with `image` in order.".into();
                p.insert("image[]".into(), list);
            }
        }
        // One of `image` / `image[]` is required: the service says so (400, param `image`).
        if let Some(Value::Array(req)) = f.get_mut("required") {
            req.retain(|r| r != "image");
        }
    }
}

fn hand_schemas() -> Vec<(&'static str, Value)> {
    let counters = |names: &[&str]| {
        let props: Map<String, Value> = names.iter().map(|n| (n.to_string(), json!({"type": "integer", "minimum": 0}))).collect();
        json!({"type": "object", "properties": props, "required": names})
    };
    let engine = [
        "graph_captures",
        "graph_replays",
        "uncaptured_runs",
        "graph_evictions",
        "capture_failures",
        "device_loop_steps",
        "host_loop_steps",
        "staged_host_copies",
    ];
    vec![
        (
            "Health",
            json!({
                "type": "object",
                "required": ["status", "gpu_available", "backend", "backend_reason", "queue_depth", "max_queue", "batch_size",
                             "batch_timeout_ms", "bundle", "lightning_enabled", "precision", "uptime_seconds", "version", "engine"],
                "properties": {
                    "status": {"enum": ["ready", "loading", "draining", "stalled", "failed"]},
                    "stall": {"type": "object", "required": ["jobs", "running_seconds", "expected_seconds"], "properties": {
                        "jobs": {"type": "integer", "minimum": 1},
                        "running_seconds": {"type": "number", "minimum": 0},
                        "expected_seconds": {"type": "number", "minimum": 0}}},
                    "gpu_available": {"type": "boolean"},
                    "backend": {"type": "string"},
                    "backend_reason": {"type": "string"},
                    "denoise_loop": {"type": ["string", "null"], "enum": ["device", "host", null]},
                    "engine": {"oneOf": [counters(&engine), {"type": "null"}]},
                    "queue_depth": {"type": "integer", "minimum": 0},
                    "max_queue": {"type": "integer", "minimum": 1},
                    "batch_size": {"type": "integer", "minimum": 1},
                    "batch_timeout_ms": {"type": "integer", "minimum": 0},
                    "bundle": {"type": "string"},
                    "lightning_enabled": {"type": "boolean"},
                    "precision": {"type": "string"},
                    "uptime_seconds": {"type": "number"},
                    "version": {"type": "string"},
                    "error": {"type": "string", "description": "Why the model failed to load (status `failed`)."},
                    "model": {
                        "type": "object",
                        "required": ["name", "variant", "max_images", "default_steps", "default_true_cfg_scale", "lightning_fused", "max_text_tokens"],
                        "properties": {
                            "name": {"type": "string"}, "variant": {"type": "string"},
                            "max_images": {"type": "integer"}, "default_steps": {"type": "integer"},
                            "default_true_cfg_scale": {"type": "number"}, "lightning_fused": {"type": "boolean"},
                            "max_text_tokens": {"type": "integer"},
                        },
                    },
                },
            }),
        ),
        (
            "Ping",
            json!({"type": "object", "required": ["status"], "properties": {"status": {"enum": ["healthy", "draining", "failed", "stalled"]}, "error": {"type": "string"}}}),
        ),
        (
            "JobState",
            json!({"type": "object", "required": ["id", "status"], "properties": {
                "id": {"type": "string"},
                "status": {"enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]},
            }}),
        ),
        (
            "JobRecord",
            json!({"type": "object", "required": ["id", "status"], "properties": {
                "id": {"type": "string"},
                "status": {"enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]},
                "requestId": {"type": "string", "description": "The X-Request-ID of the request that submitted the job."},
                "queuePosition": {"type": "integer", "minimum": 1, "description": "While IN_QUEUE: 1 for the next job to start."},
                "delayTime": {"type": "integer", "minimum": 0, "description": "Milliseconds in the queue."},
                "executionTime": {"type": "integer", "minimum": 0, "description": "Milliseconds running."},
                "output": {"$ref": "#/components/schemas/EditResponse"},
                "error": {"type": "string", "description": "JSON text {\"error_type\", \"error_message\", \"status\"}."},
            }}),
        ),
        (
            "EndpointHealth",
            json!({"type": "object", "required": ["jobs", "workers", "store"], "properties": {
                "jobs": counters(&["completed", "failed", "inProgress", "inQueue", "retried", "cancelled", "timedOut"]),
                "workers": counters(&["idle", "running", "ready", "initializing", "unhealthy", "throttled"]),
                "store": counters(&["records", "bytes", "peakBytes", "budgetBytes", "evicted", "expired"]),
            }}),
        ),
        ("QueueStatus", queue_status_schema()),
        (
            "Purged",
            json!({"type": "object", "required": ["removed", "status"], "properties": {"removed": {"type": "integer", "minimum": 0}, "status": {"const": "completed"}}}),
        ),
    ]
}

/// `GET /queue/status`'s body.
fn queue_status_schema() -> Value {
    let counters = |names: &[&str]| {
        let props: Map<String, Value> = names.iter().map(|n| (n.to_string(), json!({"type": "integer", "minimum": 0}))).collect();
        json!({"type": "object", "properties": props, "required": names})
    };
    json!({"type": "object",
        "required": ["queue_depth", "max_queue", "running", "accepting", "reason", "requests", "jobs", "batch_policy"],
        "properties": {
            "queue_depth": {"type": "integer", "minimum": 0},
            "max_queue": {"type": "integer", "minimum": 1},
            "running": {"type": "integer", "minimum": 0},
            "accepting": {"type": "boolean"},
            "reason": {"type": ["string", "null"]},
            "requests": counters(&crate::metrics::OUTCOMES),
            "jobs": counters(&["in_queue", "in_progress", "completed", "failed", "cancelled", "timed_out"]),
            "batch_policy": {"type": "object", "required": ["policy", "batch_size", "batch_timeout_ms", "arrival_rate", "wait_success", "costs"],
                "properties": {
                    "policy": {"enum": ["adaptive", "fixed"]},
                    "batch_size": {"type": "integer", "minimum": 1},
                    "batch_timeout_ms": {"type": "integer", "minimum": 0},
                    "arrival_rate": {"type": "number", "minimum": 0},
                    "wait_success": {"type": "number", "minimum": 0, "maximum": 1},
                    "costs": {"type": "array", "items": {"type": "object",
                        "required": ["batch_size", "seconds_per_image", "seconds_per_work", "batches"],
                        "properties": {
                            "batch_size": {"type": "integer", "minimum": 1},
                            "seconds_per_image": {"type": "number", "minimum": 0},
                            "seconds_per_work": {"type": "number", "minimum": 0},
                            "batches": {"type": "integer", "minimum": 1},
                        }}},
                }},
        },
    })
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// An operation: summary, responses (`(status, description, schema)`; `None` = no body), security.
fn op(summary: &str, secured: bool, responses: &[(&str, &str, Option<Value>)]) -> Value {
    let mut r = Map::new();
    for (status, description, schema) in responses {
        let mut resp = json!({"description": description});
        if let Some(s) = schema {
            resp["content"] = content(s.clone());
        }
        r.insert(status.to_string(), resp);
    }
    let mut o = json!({"summary": summary, "responses": r});
    o["security"] = if secured { json!([{"bearer": []}]) } else { json!([]) };
    o
}

fn path_params(names: &[&str]) -> Value {
    names.iter().map(|n| json!({"name": n, "in": "path", "required": true, "schema": {"type": "string"}})).collect()
}

fn paths(refs: &Map<String, Value>) -> Value {
    let r = |name: &str| refs.get(name).cloned().unwrap_or_else(|| schema_ref(name));
    let error = || Some(r("Error"));
    let run = |summary: &str| {
        let mut o = op(
            summary,
            true,
            &[("200", "The edited image.", Some(r("EditResponse"))), ("default", "An error (docs/server.md).", error())],
        );
        o["requestBody"] = json!({"required": true, "content": content(r("RunRequest"))});
        o
    };
    let mut edits = op(
        "OpenAI's image edit (multipart/form-data as the official SDKs send it).",
        true,
        &[("200", "The edited images.", Some(r("ImagesResponse"))), ("default", "OpenAI's error shape.", Some(r("OpenAiError")))],
    );
    edits["requestBody"] = json!({"required": true, "content": {"multipart/form-data": {"schema": r("ImageEditRequest")}}});
    let v2_error = || ("default", "An error (`{\"error\", \"error_type\"}`).", error());
    let mut v2_runsync = op(
        "Queue a job and wait up to `wait` ms for it.",
        true,
        &[("200", "The job's record, or its state if it has not ended.", Some(schema_ref("JobRecord"))), v2_error()],
    );
    v2_runsync["parameters"] = json!([{"name": "wait", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1000, "maximum": 300000}}]);
    v2_runsync["requestBody"] = json!({"required": true, "content": content(r("RunRequest"))});
    let mut v2_run = op("Queue a job.", true, &[("200", "The job, IN_QUEUE.", Some(schema_ref("JobState"))), v2_error()]);
    v2_run["requestBody"] = json!({"required": true, "content": content(r("RunRequest"))});
    let status = op("A job's record.", true, &[("200", "The record.", Some(schema_ref("JobRecord"))), v2_error()]);
    json!({
        "/run": {"post": run("One edit; answers when the image is ready.")},
        "/runsync": {"post": run("The same as /run.")},
        "/v1/images/edits": {"post": edits},
        "/health": {"get": op("Readiness and status.", false, &[
            ("200", "Ready.", Some(schema_ref("Health"))), ("503", "Loading, draining, failed or stalled.", Some(schema_ref("Health")))])},
        "/ping": {"get": op("RunPod load-balancer probe.", false, &[
            ("200", "Ready.", Some(schema_ref("Ping"))), ("204", "Loading.", None), ("503", "Draining, failed or stalled.", Some(schema_ref("Ping")))])},
        "/metrics": {"get": {"summary": "Prometheus metrics.", "security": [], "responses": {"200": {"description": "Prometheus text format 0.0.4.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/queue/status": {"get": op("The queue, counts by outcome, admission and the batch policy.", false, &[
            ("200", "Queue status.", Some(schema_ref("QueueStatus")))])},
        "/openapi.json": {"get": op("This document.", false, &[("200", "OpenAPI 3.1.", Some(json!({"type": "object"})))])},
        "/v2/{endpoint_id}/run": {"parameters": path_params(&["endpoint_id"]), "post": v2_run},
        "/v2/{endpoint_id}/runsync": {"parameters": path_params(&["endpoint_id"]), "post": v2_runsync},
        "/v2/{endpoint_id}/status/{id}": {"parameters": path_params(&["endpoint_id", "id"]), "get": status.clone(), "post": status},
        "/v2/{endpoint_id}/cancel/{id}": {"parameters": path_params(&["endpoint_id", "id"]), "post": op("Cancel a queued or running job.", true, &[
            ("200", "The job's record.", Some(schema_ref("JobRecord"))), v2_error()])},
        "/v2/{endpoint_id}/health": {"parameters": path_params(&["endpoint_id"]), "get": op("Job and worker counts.", true, &[
            ("200", "Counts.", Some(schema_ref("EndpointHealth"))), v2_error()])},
        "/v2/{endpoint_id}/purge-queue": {"parameters": path_params(&["endpoint_id"]), "post": op("Cancel every queued job.", true, &[
            ("200", "How many.", Some(schema_ref("Purged"))), v2_error()])},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_every_route_and_resolvable_refs() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let routes = routes();
        for want in
            [("POST", "/run"), ("POST", "/v1/images/edits"), ("GET", "/openapi.json"), ("GET", "/v2/{endpoint_id}/status/{id}")]
        {
            assert!(routes.iter().any(|(m, p)| m == want.0 && p == want.1), "{want:?} in {routes:?}");
        }
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        let form = &schemas["ImageEditRequest"]["properties"];
        for field in [
            "image",
            "image[]",
            "prompt",
            "mask",
            "n",
            "size",
            "response_format",
            "output_format",
            "output_compression",
            "model",
            "user",
            "negative_prompt",
            "num_inference_steps",
            "true_cfg_scale",
            "seed",
        ] {
            assert!(form.get(field).is_some(), "form field {field}: {form}");
        }
        assert!(schemas["EditResponse"]["required"].as_array().unwrap().iter().any(|r| r == "image"));
    }
}
