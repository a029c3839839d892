//! The worker's HTTP client for RunPod's control plane: one connection per call (plain http, or
//! https with the webpki roots), a timeout over the whole exchange and a cap on the reply's size.
//!
//! The control-plane URLs come from RunPod's own variables, so they are trusted: no SSRF guard here
//! (that guard is for URLs that arrive in jobs, `service::fetch`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use url::{Host, Url};

use super::protocol::PROTOCOL_VERSION;

/// A reply: its status, `Content-Type` and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

/// Why a call got no reply.
#[derive(Debug)]
pub enum CallError {
    /// The whole exchange took longer than its timeout (a long poll that found nothing, or a stall).
    Timeout,
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout => write!(f, "timed out"),
            CallError::Failed(m) => write!(f, "{m}"),
        }
    }
}

/// Calls the control plane with `Authorization: <RUNPOD_AI_API_KEY>` (raw, as the Python library).
pub struct Client {
    tls: tokio_rustls::TlsConnector,
    authorization: Option<HeaderValue>,
    user_agent: HeaderValue,
}

impl Client {
    pub fn new(api_key: &str) -> Result<Client, String> {
        let tls = crate::service::fetch::webpki_tls()?;
        let authorization = match api_key {
            "" => None,
            k => Some(HeaderValue::from_str(k).map_err(|_| "RUNPOD_AI_API_KEY is not a valid header value".to_string())?),
        };
        let agent = format!("qwen-edit/{} (RunPod worker protocol of runpod {PROTOCOL_VERSION})", env!("CARGO_PKG_VERSION"));
        let user_agent = HeaderValue::from_str(&agent).map_err(|e| e.to_string())?;
        Ok(Client { tls: tokio_rustls::TlsConnector::from(Arc::clone(&tls)), authorization, user_agent })
    }

    pub async fn get(&self, url: &str, timeout: Duration, max_reply: usize) -> Result<Reply, CallError> {
        self.call(Method::GET, url, &[], Bytes::new(), timeout, max_reply).await
    }

    pub async fn post(&self, url: &str, headers: &[(&str, &str)], body: Bytes, timeout: Duration) -> Result<Reply, CallError> {
        self.call(Method::POST, url, headers, body, timeout, 64 * 1024).await
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
        max_reply: usize,
    ) -> Result<Reply, CallError> {
        match tokio::time::timeout(timeout, self.exchange(method, url, headers, body, max_reply)).await {
            Ok(r) => r.map_err(CallError::Failed),
            Err(_) => Err(CallError::Timeout),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        max_reply: usize,
    ) -> Result<Reply, String> {
        let parsed = Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let host = parsed.host().ok_or_else(|| format!("`{url}` has no host"))?.to_owned();
        let port = parsed.port_or_known_default().ok_or_else(|| format!("`{url}` has no port"))?;
        let host_name = match &host {
            Host::Domain(d) => d.clone(),
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => format!("[{ip}]"),
        };
        let tcp = TcpStream::connect((host_name.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| format!("connecting to {host_name}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let path = match parsed.query() {
            Some(q) => format!("{}?{q}", parsed.path()),
            None => parsed.path().to_string(),
        };
        let host_header = match parsed.port() {
            Some(p) => format!("{host_name}:{p}"),
            None => host_name.clone(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host_header)
            .header(header::USER_AGENT, self.user_agent.clone());
        if let Some(a) = &self.authorization {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let response = if parsed.scheme() == "https" {
            let name = match host {
                Host::Domain(d) => rustls::pki_types::ServerName::try_from(d).map_err(|e| e.to_string())?,
                Host::Ipv4(ip) => rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V4(ip).into()),
                Host::Ipv6(ip) => rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V6(ip).into()),
            };
            let tls = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS with {host_name}: {e}"))?;
            send(TokioIo::new(tls), req).await?
        } else {
            send(TokioIo::new(tcp), req).await?
        };
        let status = response.status().as_u16();
        let content_type =
            response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let body = Limited::new(response.into_body(), max_reply)
            .collect()
            .await
            .map_err(|e| format!("reading the reply (at most {max_reply} bytes): {e}"))?
            .to_bytes();
        Ok(Reply { status, content_type, body })
    }
}

async fn send<S>(io: TokioIo<S>, req: Request<Full<Bytes>>) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| format!("sending the request: {e}"))
}
