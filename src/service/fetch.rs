//! Fetches `image_url` with an SSRF guard: resolve the host, refuse any non-public address, connect
//! to exactly the vetted address (no second DNS lookup to rebind), re-check every redirect hop.
//!
//! Also: http/https only (TLS by rustls with the webpki roots), at most 5 redirects, a connect
//! timeout per attempt and a total timeout for the whole fetch, a byte cap (Content-Length checked
//! first, then counted while streaming), and retries with exponential backoff for transient failures
//! (connection errors, 408/429/5xx). `ALLOW_PRIVATE_URLS` (see `config::PrivateUrls`) opens chosen
//! non-public networks; the cloud metadata endpoints (169.254.169.254, fd00:ec2::254) stay blocked.
//! Public addresses may be reached on `URL_ALLOWED_PORTS` only (80 and 443 by default), so the
//! server cannot be made to probe arbitrary ports; opened private networks take any port. Errors
//! name the host as the URL gives it, never the addresses a name resolves to.
//! The same guard posts `/v2` webhooks (`post_json`: one vetted POST per attempt, no redirects).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use url::{Host, Url};

use crate::config::{PrivateUrls, Settings};

/// Limits and policy of a fetch.
#[derive(Clone, Debug)]
pub struct FetchPolicy {
    pub private: PrivateUrls,
    pub max_bytes: usize,
    pub total_timeout: Duration,
    pub connect_timeout: Duration,
    /// Extra attempts after a transient failure.
    pub retries: u32,
    /// First backoff; doubled per retry (plus up to 50% jitter).
    pub backoff: Duration,
    pub max_redirects: usize,
    /// Ports a public address may be reached on (`None`: any).
    pub allowed_ports: Option<Vec<u16>>,
}

impl FetchPolicy {
    /// The policy the settings describe (`ALLOW_PRIVATE_URLS`, `URL_*`).
    pub fn from_settings(settings: &Settings) -> FetchPolicy {
        FetchPolicy {
            private: settings.private_urls.clone(),
            max_bytes: settings.url_max_bytes,
            total_timeout: settings.url_timeout,
            connect_timeout: settings.url_connect_timeout,
            retries: settings.url_retries,
            allowed_ports: settings.url_allowed_ports.clone(),
            ..FetchPolicy::default()
        }
    }
}

/// A TLS client configuration trusting the webpki (Mozilla) roots. Fails only if the TLS provider
/// cannot offer the default protocol versions (a build problem, reported at start-up).
pub fn webpki_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            private: PrivateUrls::Deny,
            max_bytes: 20 * 1024 * 1024,
            total_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            retries: 2,
            backoff: Duration::from_millis(200),
            max_redirects: 5,
            allowed_ports: Some(vec![80, 443]),
        }
    }
}

/// Why a URL was not fetched. Messages are user-facing.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum FetchError {
    #[error("image_url is not a valid http(s) URL: {0}")]
    InvalidUrl(String),
    #[error("image_url is not allowed: {0}")]
    Blocked(String),
    #[error("the image at image_url is larger than the {max} byte limit")]
    TooLarge { max: usize },
    #[error("could not fetch image_url: {0}")]
    Failed(String),
}

/// An attempt's failure: whether another attempt might succeed.
struct AttemptError {
    error: FetchError,
    transient: bool,
}

fn permanent(error: FetchError) -> AttemptError {
    AttemptError { error, transient: false }
}
fn transient(msg: String) -> AttemptError {
    AttemptError { error: FetchError::Failed(msg), transient: true }
}

/// The cloud metadata endpoints: never reachable, whatever `ALLOW_PRIVATE_URLS` says.
pub fn is_metadata(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4 == Ipv4Addr::new(169, 254, 169, 254) || v4 == Ipv4Addr::new(169, 254, 170, 2),
        IpAddr::V6(v6) => v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
    }
}

/// Whether `ip` is a globally routable unicast address (not loopback, private, link-local, CGNAT,
/// multicast, unspecified, broadcast, documentation, benchmarking, reserved, IPv4-mapped/-compatible
/// IPv6, NAT64 of a non-public IPv4, 6to4 of a non-public IPv4, Teredo, ULA, site-local).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // 0.0.0.0/8 "this network", incl. unspecified
        || a == 10                             // private
        || a == 127                            // loopback
        || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10 CGNAT
        || (a == 169 && b == 254)              // link-local, incl. 169.254.169.254
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // 192.0.0.0/24 IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // TEST-NET-1
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 192 && b == 168)              // private
        || (a == 198 && (b == 18 || b == 19))  // benchmarking
        || (a == 198 && b == 51 && c == 100)   // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)    // TEST-NET-3
        || a >= 224) // multicast 224/4, reserved 240/4, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // 64:ff9b::/96 NAT64 (well-known prefix): public only if the IPv4 inside is.
    if s[0..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded_v4(s[6], s[7]));
    }
    // Only global unicast (2000::/3) is public. Everything else is not, which covers every form that
    // carries an IPv4 address in the low bits without a public prefix: ::/96 (compatible),
    // ::ffff:0:0/96 (mapped), ::ffff:0:0:0/96 (translated), 64:ff9b:1::/48 (local-use NAT64), and
    // also ::/128, ::1, 100::/64, fc00::/7, fe80::/10, fec0::/10, ff00::/8.
    if (s[0] & 0xe000) != 0x2000 {
        return false;
    }
    // 6to4 2002::/16: public only if the IPv4 inside is.
    if s[0] == 0x2002 {
        return is_public_v4(embedded_v4(s[1], s[2]));
    }
    // ISATAP interface identifiers (::0:5efe:a.b.c.d, ::200:5efe:a.b.c.d) under any prefix: the
    // IPv4 inside must be public too.
    if s[5] == 0x5efe && (s[4] & 0xfdff) == 0 && !is_public_v4(embedded_v4(s[6], s[7])) {
        return false;
    }
    // 2001::/23 IETF protocol assignments (Teredo, ORCHID, benchmarking, ...), 2001:db8::/32 documentation.
    let special_2001 = s[0] == 0x2001 && (s[1] < 0x200 || s[1] == 0xdb8);
    // 3fff::/20 documentation.
    let documentation = s[0] == 0x3fff && s[1] < 0x1000;
    !(special_2001 || documentation)
}

/// Why an address may not be fetched from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Metadata,
    NotPublic,
}

impl Block {
    /// The message, naming `host` as the URL gives it (never an address it resolved to).
    fn message(self, host: &str, resolved: bool) -> String {
        match (self, resolved) {
            (Block::Metadata, true) => format!("{host} resolves to a cloud metadata endpoint"),
            (Block::Metadata, false) => format!("{host} is a cloud metadata endpoint"),
            (Block::NotPublic, true) => format!(
                "{host} is not a public address: it resolves to a loopback, private, link-local or other non-public range; \
                 fetching from it is off (ALLOW_PRIVATE_URLS)"
            ),
            (Block::NotPublic, false) => format!(
                "{host} is not a public address (loopback, private, link-local, ...); fetching from it is off (ALLOW_PRIVATE_URLS)"
            ),
        }
    }
}

/// `Ok(true)` for a public address, `Ok(false)` for a non-public one that `policy` opens.
fn classify(ip: IpAddr, policy: &PrivateUrls) -> Result<bool, Block> {
    if is_metadata(ip) {
        return Err(Block::Metadata);
    }
    if is_public(ip) {
        return Ok(true);
    }
    let allowed = match policy {
        PrivateUrls::Deny => false,
        PrivateUrls::AllowAll => true,
        PrivateUrls::Allow(nets) => nets.iter().any(|n| n.contains(&ip)),
    };
    if allowed {
        Ok(false)
    } else {
        Err(Block::NotPublic)
    }
}

/// Whether `policy` lets a fetch connect to `ip`; the error names the address and the fix.
pub fn check_address(ip: IpAddr, policy: &PrivateUrls) -> Result<(), String> {
    classify(ip, policy).map(|_| ()).map_err(|b| b.message(&ip.to_string(), false))
}

/// Fetches image URLs under one policy. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    policy: FetchPolicy,
    tls: tokio_rustls::TlsConnector,
}

impl Fetcher {
    /// A fetcher that trusts the webpki (Mozilla) roots. Fails only if the TLS provider cannot
    /// offer the default protocol versions (a build problem, reported at start-up).
    pub fn new(policy: FetchPolicy) -> Result<Fetcher, String> {
        Ok(Fetcher::with_tls(policy, webpki_tls().map_err(|e| format!("{e} (for image_url)"))?))
    }

    /// A fetcher with its own TLS configuration (tests, private CAs).
    pub fn with_tls(policy: FetchPolicy, tls: Arc<rustls::ClientConfig>) -> Fetcher {
        Fetcher { policy, tls: tokio_rustls::TlsConnector::from(tls) }
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// The body at `url`, following vetted redirects, retrying transient failures.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, FetchError> {
        let start = Url::parse(url.trim()).map_err(|e| FetchError::InvalidUrl(format!("`{}`: {e}", clip(url))))?;
        check_url(&start)?;
        self.retrying(url, || self.fetch_once(&start)).await
    }

    /// Runs `attempt` until it succeeds, fails for good, runs out of `URL_RETRIES` or of `URL_TIMEOUT`
    /// in all; transient failures wait an exponential backoff with jitter between attempts.
    async fn retrying<T, F, Fut>(&self, url: &str, mut attempt: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, AttemptError>>,
    {
        let total = self.policy.total_timeout;
        let deadline = Instant::now() + total;
        let work = async {
            let mut tries = 0u32;
            loop {
                match attempt().await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.transient && tries < self.policy.retries => {
                        let base = self.policy.backoff.saturating_mul(1u32 << tries.min(16));
                        let wait = base + base.mul_f64(rand::random::<f64>() * 0.5);
                        if Instant::now() + wait >= deadline {
                            return Err(e.error);
                        }
                        tracing::debug!(url = %clip(url), attempt = tries, error = %e.error, "request failed, retrying");
                        tokio::time::sleep(wait).await;
                        tries += 1;
                    }
                    Err(e) => return Err(e.error),
                }
            }
        };
        match tokio::time::timeout(total, work).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Failed(format!("timed out after {:.1} s (URL_TIMEOUT)", total.as_secs_f64()))),
        }
    }

    /// Checks what can be checked of `url` without the network: an http(s) URL without credentials,
    /// and, when its host is an IP address, an address the policy lets through.
    pub fn vet(&self, url: &str) -> Result<Url, FetchError> {
        let parsed = Url::parse(url.trim()).map_err(|e| FetchError::InvalidUrl(format!("`{}`: {e}", clip(url))))?;
        check_url(&parsed)?;
        let ip = match parsed.host() {
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = ip {
            check_address(ip, &self.policy.private).map_err(FetchError::Blocked)?;
        }
        Ok(parsed)
    }

    /// POSTs a JSON `body` to `url` under the same guard as `fetch` (every attempt resolves and vets
    /// the host again); redirects are not followed. Retries transient failures (connection errors,
    /// 408, 429, 5xx) like `fetch`; returns the final status (2xx) or why it failed.
    pub async fn post_json(&self, url: &str, body: Bytes) -> Result<u16, FetchError> {
        let target = self.vet(url)?;
        self.retrying(url, || async {
            let r = self.request(&target, http::Method::POST, body.clone()).await?;
            let status = r.status();
            if status.is_success() {
                return Ok(status.as_u16());
            }
            let error = FetchError::Failed(format!("the server answered {status} for {}", clip(url)));
            Err(AttemptError { error, transient: matches!(status.as_u16(), 408 | 429 | 500..=599) })
        })
        .await
    }

    async fn fetch_once(&self, start: &Url) -> Result<Bytes, AttemptError> {
        let mut url = start.clone();
        let mut hops = 0usize;
        loop {
            let response = self.request(&url, http::Method::GET, Bytes::new()).await?;
            let status = response.status();
            if status.is_redirection() && status != http::StatusCode::NOT_MODIFIED {
                let location = response.headers().get(http::header::LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
                    permanent(FetchError::Failed(format!("{} redirect without a Location header", status.as_u16())))
                })?;
                if hops >= self.policy.max_redirects {
                    return Err(permanent(FetchError::Failed(format!("more than {} redirects", self.policy.max_redirects))));
                }
                let next = url
                    .join(location)
                    .map_err(|e| permanent(FetchError::InvalidUrl(format!("redirect to `{}`: {e}", clip(location)))))?;
                check_url(&next).map_err(permanent)?;
                url = next;
                hops += 1;
                continue;
            }
            if !status.is_success() {
                let retry = matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504);
                let e = FetchError::Failed(format!("the server answered {status} for {}", clip(url.as_str())));
                return Err(AttemptError { error: e, transient: retry });
            }
            return self.read_body(response).await;
        }
    }

    async fn read_body(&self, response: http::Response<hyper::body::Incoming>) -> Result<Bytes, AttemptError> {
        let max = self.policy.max_bytes;
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(permanent(FetchError::TooLarge { max }));
        }
        let mut body = response.into_body();
        let mut out = Vec::with_capacity(declared.map_or(64 * 1024, |n| n as usize));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| transient(format!("reading the body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                if out.len() + data.len() > max {
                    return Err(permanent(FetchError::TooLarge { max }));
                }
                out.extend_from_slice(data);
            }
        }
        Ok(Bytes::from(out))
    }

    /// One request (GET, or POST with a JSON body) to the vetted address of `url`'s host.
    async fn request(
        &self,
        url: &Url,
        method: http::Method,
        body: Bytes,
    ) -> Result<http::Response<hyper::body::Incoming>, AttemptError> {
        let host = url.host().ok_or_else(|| permanent(FetchError::InvalidUrl("no host".into())))?;
        let port = url.port_or_known_default().ok_or_else(|| permanent(FetchError::InvalidUrl("no port".into())))?;
        let addr = self.resolve(&host, port).await?;
        let shown = format!("{}:{port}", host_for_header(&host)); // what the URL says, not what it resolved to
        let tcp = tokio::time::timeout(self.policy.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                transient(format!("connecting to {shown} timed out after {:.1} s", self.policy.connect_timeout.as_secs_f64()))
            })?
            .map_err(|e| transient(format!("connecting to {shown}: {}", io_reason(&e))))?;
        let _ = tcp.set_nodelay(true);

        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let host_header = match url.port() {
            Some(p) => format!("{}:{p}", host_for_header(&host)),
            None => host_for_header(&host),
        };
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, host_header)
            .header(http::header::USER_AGENT, concat!("qwen-edit/", env!("CARGO_PKG_VERSION")));
        req = if method == http::Method::GET {
            req.header(http::header::ACCEPT, "image/png, image/jpeg, image/webp, image/*;q=0.8")
        } else {
            req.header(http::header::CONTENT_TYPE, "application/json")
        };
        let req = req.body(Full::new(body)).map_err(|e| permanent(FetchError::InvalidUrl(e.to_string())))?;

        if url.scheme() == "https" {
            let name = match &host {
                Host::Domain(d) => rustls::pki_types::ServerName::try_from(d.to_string()),
                Host::Ipv4(ip) => Ok(rustls::pki_types::ServerName::IpAddress(IpAddr::V4(*ip).into())),
                Host::Ipv6(ip) => Ok(rustls::pki_types::ServerName::IpAddress(IpAddr::V6(*ip).into())),
            }
            .map_err(|e| permanent(FetchError::InvalidUrl(format!("TLS server name: {e}"))))?;
            let tls = tokio::time::timeout(self.policy.connect_timeout, self.tls.connect(name, tcp))
                .await
                .map_err(|_| transient("the TLS handshake timed out".into()))?
                .map_err(|e| permanent(FetchError::Failed(format!("TLS handshake with {shown}: {e}"))))?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
    }

    /// Resolves `host` and vets every address; returns the one to connect to.
    async fn resolve(&self, host: &Host<&str>, port: u16) -> Result<SocketAddr, AttemptError> {
        let addrs: Vec<SocketAddr> = match host {
            Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), port)],
            Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), port)],
            Host::Domain(d) => tokio::time::timeout(self.policy.connect_timeout, tokio::net::lookup_host((*d, port)))
                .await
                .map_err(|_| transient(format!("resolving {d} timed out")))?
                .map_err(|e| permanent(FetchError::Failed(format!("cannot resolve {d}: {e}"))))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(permanent(FetchError::Failed(format!("{host} has no address"))));
        }
        // Every address must pass: a name that resolves to both a public and a private address is
        // refused rather than raced. A name's message never says what it resolved to.
        let resolved = matches!(host, Host::Domain(_));
        let name = host.to_string();
        let mut public = false;
        for a in &addrs {
            public |=
                classify(a.ip(), &self.policy.private).map_err(|b| permanent(FetchError::Blocked(b.message(&name, resolved))))?;
        }
        if let Some(ports) = self.policy.allowed_ports.as_ref().filter(|p| public && !p.contains(&port)) {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            return Err(permanent(FetchError::Blocked(format!(
                "port {port} is not allowed for public addresses (URL_ALLOWED_PORTS: {})",
                list.join(", ")
            ))));
        }
        Ok(addrs[0])
    }
}

async fn send<S>(io: TokioIo<S>, req: http::Request<Full<Bytes>>) -> Result<http::Response<hyper::body::Incoming>, AttemptError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| transient(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        // Ends with the response body (or the fetch being dropped).
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| transient(format!("sending the request: {e}")))
}

/// An I/O error's reason without the addresses some errors carry.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        std::io::ErrorKind::TimedOut => "timed out".into(),
        kind => kind.to_string(),
    }
}

fn host_for_header(host: &Host<&str>) -> String {
    match host {
        Host::Domain(d) => d.to_string(),
        Host::Ipv4(ip) => ip.to_string(),
        Host::Ipv6(ip) => format!("[{ip}]"),
    }
}

/// Scheme and shape checks that need no network.
fn check_url(url: &Url) -> Result<(), FetchError> {
    match url.scheme() {
        "http" | "https" => {}
        s => return Err(FetchError::InvalidUrl(format!("scheme `{s}` is not allowed; use http or https"))),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FetchError::InvalidUrl("credentials in the URL are not accepted".into()));
    }
    if url.host().is_none() {
        return Err(FetchError::InvalidUrl("the URL has no host".into()));
    }
    Ok(())
}

fn clip(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        s.to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn address_classes() {
        let blocked = [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "198.18.0.1",
            "192.0.0.8",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "2001:db8::1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "2001::1",
            "fec0::1",
            "100::1",
            "64:ff9b:1::1",
            // IPv4-translated (::ffff:0:0:0/96), local-use NAT64 with a private IPv4 inside, ISATAP
            // identifiers carrying a private IPv4, documentation 3fff::/20, IETF 2001::/23.
            "::ffff:0:7f00:1",
            "::ffff:0:a00:1",
            "::ffff:0:a9fe:a9fe",
            "::ffff:0:808:808",
            "64:ff9b:1::a00:1",
            "64:ff9b:1:ffff::7f00:1",
            "2001:470:1f0b::5efe:a00:1",
            "2a00:1450::200:5efe:c0a8:101",
            "3fff::1",
            "2001:2::1",
            "2001:1ff::1",
            "4000::1",
            "::8.8.8.8",
        ];
        for a in blocked {
            assert!(!is_public(a.parse().unwrap()), "{a} must not be public");
        }
        let public = [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "169.253.1.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "11.0.0.1",
            "2a00:1450::200:5efe:808:808",
            "2001:200::1",
        ];
        for a in public {
            assert!(is_public(a.parse().unwrap()), "{a} must be public");
        }
    }

    #[test]
    fn policy_opens_only_what_it_names_and_never_metadata() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(check_address(ip("127.0.0.1"), &PrivateUrls::Deny).unwrap_err().contains("ALLOW_PRIVATE_URLS"));
        assert!(check_address(ip("127.0.0.1"), &PrivateUrls::AllowAll).is_ok());
        let only = PrivateUrls::Allow(vec!["127.0.0.1/32".parse().unwrap()]);
        assert!(check_address(ip("127.0.0.1"), &only).is_ok());
        assert!(check_address(ip("127.0.0.2"), &only).is_err());
        assert!(check_address(ip("10.0.0.1"), &only).is_err());
        assert!(check_address(ip("8.8.8.8"), &only).is_ok());
        for meta in ["169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"] {
            let e = check_address(ip(meta), &PrivateUrls::AllowAll).unwrap_err();
            assert!(e.contains("metadata"), "{meta}: {e}");
        }
    }

    fn policy(private: PrivateUrls) -> FetchPolicy {
        FetchPolicy {
            private,
            max_bytes: 1000,
            total_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            retries: 2,
            backoff: Duration::from_millis(10),
            max_redirects: 5,
            allowed_ports: Some(vec![80, 443]),
        }
    }

    fn loopback_only() -> PrivateUrls {
        PrivateUrls::Allow(vec!["127.0.0.1/32".parse().unwrap()])
    }

    /// A loopback HTTP server answering each connection with `respond(n, request)` (n = 0, 1, ...).
    async fn fixture<F>(respond: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(usize, String) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let respond = Arc::new(respond);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let n = c.fetch_add(1, Ordering::SeqCst);
                let respond = respond.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => req.extend_from_slice(&buf[..k]),
                        }
                    }
                    match respond(n, String::from_utf8_lossy(&req).into_owned()) {
                        Some(bytes) => {
                            let _ = s.write_all(&bytes).await;
                            let _ = s.shutdown().await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(30)).await, // hang
                    }
                });
            }
        });
        (addr, count)
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
        v.extend_from_slice(body);
        v
    }

    fn redirect(to: &str) -> Vec<u8> {
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn blocked_targets_are_refused_before_connecting() {
        let f = Fetcher::new(policy(PrivateUrls::Deny)).unwrap();
        for url in [
            "http://127.0.0.1/x.png",
            "http://localhost:1/x.png",
            "http://[::1]/x.png",
            "http://10.0.0.1/x.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:127.0.0.1]/x.png",
            "http://0x7f.1/x.png",
            "http://2130706433/x.png",
            "http://0.0.0.0/",
            "http://100.64.0.1/",
            "https://[fe80::1]/",
            "http://224.0.0.1/",
        ] {
            match f.fetch(url).await {
                Err(FetchError::Blocked(m)) => {
                    assert!(m.contains("not a public address") || m.contains("metadata"), "{url}: {m}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        for url in [
            "ftp://example.com/a.png",
            "file:///etc/passwd",
            "gopher://x/",
            "http://user:pw@example.com/",
            "not a url",
            "data:image/png;base64,AA",
        ] {
            assert!(matches!(f.fetch(url).await, Err(FetchError::InvalidUrl(_))), "{url}");
        }
    }

    #[tokio::test]
    async fn errors_never_echo_resolved_addresses_and_public_ports_are_limited() {
        let f = Fetcher::new(policy(PrivateUrls::Deny)).unwrap();
        let e = f.fetch("http://localhost:8080/x.png").await.unwrap_err().to_string();
        assert!(e.contains("localhost is not a public address: it resolves to"), "{e}");
        assert!(!e.contains("127.0.0.1") && !e.contains("::1"), "the resolved address leaked: {e}");
        // A public address on a port that is not allowed: refused before connecting.
        for url in ["http://8.8.8.8:8080/x.png", "https://1.1.1.1:22/", "http://[2606:4700::1111]:6379/"] {
            let t = Instant::now();
            match f.fetch(url).await {
                Err(FetchError::Blocked(m)) => assert!(m.contains("URL_ALLOWED_PORTS: 80, 443"), "{url}: {m}"),
                other => panic!("{url}: {other:?}"),
            }
            assert!(t.elapsed() < Duration::from_millis(500), "{url} was connected to");
        }
        // Opened private networks take any port (the fixtures of these tests live on ephemeral ones).
        let (addr, _) = fixture(|_, _| Some(ok(b"x"))).await;
        let open = Fetcher::new(policy(loopback_only())).unwrap();
        assert_eq!(&open.fetch(&format!("http://{addr}/")).await.unwrap()[..], b"x");
        // A refused connection says the host as the URL gives it.
        let port = { std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port() };
        let fast = Fetcher::new(FetchPolicy { retries: 0, ..policy(PrivateUrls::AllowAll) }).unwrap();
        let e = fast.fetch(&format!("http://localhost:{port}/")).await.unwrap_err().to_string();
        assert!(e.contains(&format!("connecting to localhost:{port}: connection refused")), "{e}");
    }

    #[tokio::test]
    async fn fetches_from_an_allowed_fixture_and_pins_the_host_header() {
        let (addr, _) = fixture(|_, req| {
            let host_ok = req.to_ascii_lowercase().contains("host: 127.0.0.1:");
            Some(ok(if host_ok { b"image-bytes" } else { b"bad-host" }))
        })
        .await;
        let f = Fetcher::new(policy(loopback_only())).unwrap();
        assert_eq!(&f.fetch(&format!("http://{addr}/a.png?x=1")).await.unwrap()[..], b"image-bytes");
        // The same fixture is blocked without the opt-out.
        let strict = Fetcher::new(policy(PrivateUrls::Deny)).unwrap();
        assert!(matches!(strict.fetch(&format!("http://{addr}/a.png")).await, Err(FetchError::Blocked(_))));
    }

    #[tokio::test]
    async fn every_redirect_hop_is_rechecked() {
        let (addr, _) = fixture(move |_, req| {
            if req.starts_with("GET /to-private") {
                Some(redirect("http://127.0.0.2:9/secret")) // loopback, but not in the allowed /32
            } else if req.starts_with("GET /to-metadata") {
                Some(redirect("http://169.254.169.254/latest/meta-data/"))
            } else if req.starts_with("GET /to-file") {
                Some(redirect("file:///etc/passwd"))
            } else if req.starts_with("GET /final") {
                Some(ok(b"done"))
            } else {
                Some(redirect("/final"))
            }
        })
        .await;
        let f = Fetcher::new(policy(loopback_only())).unwrap();
        assert_eq!(&f.fetch(&format!("http://{addr}/start")).await.unwrap()[..], b"done");
        let e = f.fetch(&format!("http://{addr}/to-private")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Blocked(m) if m.contains("127.0.0.2")), "{e:?}");
        let e = f.fetch(&format!("http://{addr}/to-metadata")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Blocked(m) if m.contains("metadata")), "{e:?}");
        assert!(matches!(f.fetch(&format!("http://{addr}/to-file")).await, Err(FetchError::InvalidUrl(_))));
    }

    #[tokio::test]
    async fn redirect_loops_stop_after_five() {
        let (addr, count) = fixture(|n, _| Some(redirect(&format!("/hop{n}")))).await;
        let f = Fetcher::new(FetchPolicy { retries: 0, ..policy(loopback_only()) }).unwrap();
        let e = f.fetch(&format!("http://{addr}/")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Failed(m) if m.contains("more than 5 redirects")), "{e:?}");
        assert_eq!(count.load(Ordering::SeqCst), 6, "the first request and 5 redirects");
    }

    #[tokio::test]
    async fn byte_cap_by_header_and_by_stream() {
        let (addr, _) = fixture(|_, req| {
            if req.starts_with("GET /declared") {
                Some(ok(&[0u8; 1001]))
            } else {
                // No Content-Length: counted while streaming.
                let mut v = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                v.extend_from_slice(&[1u8; 5000]);
                Some(v)
            }
        })
        .await;
        let f = Fetcher::new(policy(loopback_only())).unwrap();
        assert_eq!(f.fetch(&format!("http://{addr}/declared")).await.unwrap_err(), FetchError::TooLarge { max: 1000 });
        assert_eq!(f.fetch(&format!("http://{addr}/streamed")).await.unwrap_err(), FetchError::TooLarge { max: 1000 });
    }

    #[tokio::test]
    async fn webhook_posts_are_guarded_retried_and_never_redirected() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let (addr, count) = fixture(move |n, req| {
            s.lock().unwrap().push(req.clone());
            Some(match (n, req.starts_with("POST /moved")) {
                (_, true) => redirect("/elsewhere"),
                (0, _) => b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec(),
                _ => ok(b""),
            })
        })
        .await;
        let f = Fetcher::new(policy(loopback_only())).unwrap();
        let status = f.post_json(&format!("http://{addr}/hook"), Bytes::from_static(b"{\"id\":\"j\"}")).await.unwrap();
        assert_eq!((status, count.load(Ordering::SeqCst)), (200, 2), "a 503 is retried");
        let first = seen.lock().unwrap()[0].to_ascii_lowercase();
        assert!(first.starts_with("post /hook ") && first.contains("content-type: application/json"), "{first}");
        let e = f.post_json(&format!("http://{addr}/moved"), Bytes::new()).await.unwrap_err();
        assert!(matches!(&e, FetchError::Failed(m) if m.contains("302")), "redirects are not followed: {e:?}");
        assert_eq!(count.load(Ordering::SeqCst), 3);
        // The guard: refused before connecting.
        let deny = Fetcher::new(policy(PrivateUrls::Deny)).unwrap();
        assert!(matches!(deny.post_json(&format!("http://{addr}/hook"), Bytes::new()).await, Err(FetchError::Blocked(_))));
        assert!(deny.vet("http://localhost:1/").is_ok(), "names are resolved and vetted when posting");
        assert!(matches!(deny.post_json("http://localhost:1/", Bytes::new()).await, Err(FetchError::Blocked(_))));
        assert!(matches!(deny.vet("ftp://example.com/"), Err(FetchError::InvalidUrl(_))));
        assert!(matches!(deny.vet("http://[::1]/"), Err(FetchError::Blocked(_))));
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn transient_failures_are_retried_with_backoff_and_permanent_ones_are_not() {
        let (addr, count) = fixture(|n, _| {
            Some(if n < 2 {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec()
            } else {
                ok(b"third time")
            })
        })
        .await;
        let f = Fetcher::new(policy(loopback_only())).unwrap();
        assert_eq!(&f.fetch(&format!("http://{addr}/")).await.unwrap()[..], b"third time");
        assert_eq!(count.load(Ordering::SeqCst), 3);

        let (addr, count) = fixture(|_, _| Some(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec())).await;
        let e = f.fetch(&format!("http://{addr}/missing.png")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Failed(m) if m.contains("404")), "{e:?}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "a 404 is not retried");

        // Connection refused: transient, retried, then reported.
        let port = { std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port() };
        let e = f.fetch(&format!("http://127.0.0.1:{port}/")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Failed(m) if m.contains("connecting to")), "{e:?}");
    }

    #[tokio::test]
    async fn total_timeout_bounds_a_hanging_server() {
        let (addr, _) = fixture(|_, _| None).await;
        let f = Fetcher::new(FetchPolicy { total_timeout: Duration::from_millis(300), ..policy(loopback_only()) }).unwrap();
        let t = Instant::now();
        let e = f.fetch(&format!("http://{addr}/")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Failed(m) if m.contains("timed out")), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    /// A CA and a leaf certificate for `names`, signed by it (DER).
    struct TestPki {
        ca: rustls::pki_types::CertificateDer<'static>,
        leaf: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    }

    fn pki(names: &[&str]) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        TestPki {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        }
    }

    /// A loopback HTTPS server answering every request with `body`.
    async fn tls_fixture(p: &TestPki, body: &'static [u8]) -> SocketAddr {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![p.leaf.clone()], p.key.clone_key())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else { return };
                    let mut buf = vec![0u8; 4096];
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => req.extend_from_slice(&buf[..k]),
                        }
                    }
                    let _ = s.write_all(&ok(body)).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    fn trusting(ca: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    #[tokio::test]
    async fn https_verifies_the_chain_and_the_name() {
        let good = pki(&["127.0.0.1", "localhost"]);
        let addr = tls_fixture(&good, b"secure image").await;
        let f = Fetcher::with_tls(FetchPolicy { retries: 0, ..policy(loopback_only()) }, trusting(&good.ca));
        assert_eq!(&f.fetch(&format!("https://{addr}/a.png")).await.unwrap()[..], b"secure image");

        // The default roots do not trust the test CA.
        let public_roots = Fetcher::new(FetchPolicy { retries: 0, ..policy(loopback_only()) }).unwrap();
        let e = public_roots.fetch(&format!("https://{addr}/a.png")).await.unwrap_err();
        assert!(matches!(&e, FetchError::Failed(m) if m.contains("TLS") && m.contains("UnknownIssuer")), "{e:?}");

        // A certificate for another name is refused even from a trusted CA.
        let other = pki(&["images.example.com"]);
        let addr = tls_fixture(&other, b"x").await;
        let f = Fetcher::with_tls(FetchPolicy { retries: 0, ..policy(loopback_only()) }, trusting(&other.ca));
        let e = f.fetch(&format!("https://{addr}/a.png")).await.unwrap_err();
        assert!(
            matches!(&e, FetchError::Failed(m) if m.contains("TLS") && m.to_lowercase().contains("not valid for name")),
            "{e:?}"
        );
    }
}
