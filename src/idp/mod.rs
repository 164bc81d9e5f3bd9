//! The identity providers that Validate asks about tokens it has not cached (SPEC §9):
//! Appwrite's REST API ([`appwrite`]) and RFC 7662 token introspection
//! ([`introspection`]), behind one small trait.
//!
//! A provider answers [`Answer::Valid`] with the session, [`Answer::Invalid`] when it
//! refused the token, or an [`IdpError`]. Only `Invalid` is a verdict about the token;
//! every error means "UNAVAILABLE, nothing cached" to the caller, so a provider that
//! is down, slow, rate limiting or misconfigured never turns into refused sessions.
//!
//! Tokens never leave this module in an error: they travel in a header (Appwrite) or a
//! form body (introspection), never in a URL, and every text taken from a provider's
//! answer is scrubbed of the token and the client secret before it enters an error.

pub mod appwrite;
pub mod config;
pub mod introspection;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use reqwest::{Response, StatusCode, redirect};
use rustls_pki_types::CertificateDer;

pub use config::{IdpFlags, IdpKind, Secret};

use crate::{
    entry::Session,
    error::SetupError,
    files::{read_certificates, read_secret},
};

/// What a provider says about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The token is good: this is whose session it is, and until when.
    Valid(Session),
    /// The provider refused the token (unknown, expired, revoked, signed out).
    Invalid,
}

impl Answer {
    /// The metrics label: "valid" or "invalid".
    pub fn label(&self) -> &'static str {
        match self {
            Answer::Valid(_) => "valid",
            Answer::Invalid => "invalid",
        }
    }
}

/// Why a provider gave no verdict. Every variant means UNAVAILABLE to the caller, and
/// nothing is cached. The `Display` never contains the token or a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdpError {
    /// No connection, or the connection broke before an answer (refused, reset).
    #[error("the identity provider is unreachable: {0}")]
    Unreachable(String),
    /// No complete answer within `--idp-timeout-ms`.
    #[error("the identity provider did not answer within --idp-timeout-ms")]
    Timeout,
    /// HTTP 429: the provider asks us to slow down.
    #[error("the identity provider is rate limiting this service (HTTP 429)")]
    RateLimited,
    /// An HTTP 5xx.
    #[error("the identity provider failed (HTTP {0})")]
    ServerError(u16),
    /// An answer that does not parse, or a status that says the service is
    /// misconfigured (a wrong project, endpoint or client credentials).
    #[error("unexpected answer from the identity provider: {0}")]
    Unexpected(String),
}

impl IdpError {
    /// The metrics label of this failure.
    pub fn result_label(&self) -> &'static str {
        match self {
            IdpError::Unreachable(_) => "unreachable",
            IdpError::Timeout => "timeout",
            IdpError::RateLimited => "rate_limited",
            IdpError::ServerError(_) => "server_error",
            IdpError::Unexpected(_) => "unexpected",
        }
    }
}

/// Every value [`result_label`] gives, so that metrics can be exported from start-up
/// (SPEC §10).
pub const RESULT_LABELS: [&str; 7] = [
    "valid",
    "invalid",
    "unreachable",
    "timeout",
    "rate_limited",
    "server_error",
    "unexpected",
];

/// The metrics label of a provider call's result.
pub fn result_label(result: &Result<Answer, IdpError>) -> &'static str {
    match result {
        Ok(answer) => answer.label(),
        Err(e) => e.result_label(),
    }
}

/// The boxed future of [`Provider::validate`].
pub type Validation<'a> = Pin<Box<dyn Future<Output = Result<Answer, IdpError>> + Send + 'a>>;

/// The boxed future of [`Provider::validate_with_session_id`]: the answer, and the
/// provider's own ID of the session when the answer names one.
pub type SessionValidation<'a> =
    Pin<Box<dyn Future<Output = (Result<Answer, IdpError>, Option<String>)> + Send + 'a>>;

/// An identity provider. One boxed future per call: a call costs milliseconds of
/// network, the allocation nothing.
pub trait Provider: Send + Sync + 'static {
    /// "appwrite" or "introspection": the metrics label.
    fn name(&self) -> &'static str;

    /// Asks the provider about `token`, within `--idp-timeout-ms`.
    fn validate<'a>(&'a self, token: &'a str) -> Validation<'a>;

    /// [`Provider::validate`], with the provider's own ID of the session when its answer
    /// names one (the `sid` of an introspection answer), so that a back-channel logout
    /// naming only that session can be carried out (SPEC §12). By default, none.
    fn validate_with_session_id<'a>(&'a self, token: &'a str) -> SessionValidation<'a> {
        Box::pin(async move { (self.validate(token).await, None) })
    }
}

/// The provider the flags name, with every file they name read and checked now, so
/// that a bad file stops the start before a port is bound. `None` without `--idp`.
pub fn from_config(flags: &IdpFlags) -> Result<Option<Arc<dyn Provider>>, SetupError> {
    flags.validate().map_err(SetupError::Flags)?;
    let Some(kind) = flags.idp else {
        return Ok(None);
    };
    let extra_roots = match &flags.idp_ca_file {
        Some(path) => read_certificates(path, "--idp-ca-file")?.1,
        None => Vec::new(),
    };
    Ok(Some(match kind {
        IdpKind::Appwrite => {
            let endpoint = flags.appwrite_endpoint.as_deref().unwrap_or_default();
            let http = http_client(
                flags.timeout(),
                flags.idp_max_in_flight,
                endpoint,
                extra_roots,
            )?;
            Arc::new(appwrite::Appwrite::new(
                http,
                endpoint,
                flags.appwrite_project.clone().unwrap_or_default(),
                flags.appwrite_tier_pref.clone(),
            )) as Arc<dyn Provider>
        }
        IdpKind::Introspection => {
            let secret = match (
                &flags.introspection_client_secret_file,
                &flags.introspection_client_secret,
            ) {
                (Some(path), _) => Secret(read_secret(path, "--introspection-client-secret-file")?),
                (None, Some(secret)) => secret.clone(),
                (None, None) => {
                    return Err(SetupError::Flags(
                        "--idp introspection needs a client secret".into(),
                    ));
                }
            };
            let url = flags.introspection_url.as_deref().unwrap_or_default();
            let http = http_client(flags.timeout(), flags.idp_max_in_flight, url, extra_roots)?;
            Arc::new(introspection::Introspection::new(
                http,
                url,
                introspection::Client {
                    id: flags.introspection_client_id.clone().unwrap_or_default(),
                    secret,
                },
                flags.introspection_tier_claim.clone(),
            )) as Arc<dyn Provider>
        }
    }))
}

/// The HTTP client both providers use: a connection pool, `timeout` for connecting
/// and for the whole call, no redirects (a redirect would carry the token to wherever
/// it points, and reqwest strips only the standard credential headers), and rustls on
/// ring with the system's roots plus `--idp-ca-file`. `HTTPS_PROXY`, `HTTP_PROXY` and
/// `NO_PROXY` in the environment are honoured, as by most HTTP clients.
pub fn http_client(
    timeout: Duration,
    max_in_flight: u32,
    url: &str,
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<reqwest::Client, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    // The system's roots are read only when they can matter, at start-up.
    if url.starts_with("https://") {
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if roots.is_empty() && extra_roots.is_empty() {
            return Err(SetupError::HttpClient(
                "no trusted root certificates on this system for the provider's https URL: \
                 install the system's CA certificates or give --idp-ca-file"
                    .into(),
            ));
        }
    }
    for der in extra_roots {
        roots
            .add(der)
            .map_err(|e| SetupError::HttpClient(format!("--idp-ca-file: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::HttpClient(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .user_agent(concat!("session-cache/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(redirect::Policy::none())
        .pool_max_idle_per_host(max_in_flight as usize)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| SetupError::HttpClient(e.without_url().to_string()))
}

/// Largest answer body read from a provider; a user and a session take a few KiB.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// An HTTP answer, read whole (within the call's timeout and [`MAX_BODY_BYTES`]).
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// The `Location` of a redirect, for the error that names it.
    pub location: Option<String>,
}

/// Sends a request and reads its answer, mapping transport failures.
pub(crate) async fn send(request: reqwest::RequestBuilder) -> Result<Reply, IdpError> {
    let mut response: Response = request.send().await.map_err(transport_error)?;
    let status = response.status();
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(IdpError::Unexpected(format!(
                "HTTP {} with a body over {MAX_BODY_BYTES} bytes",
                status.as_u16()
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status,
        body,
        location,
    })
}

/// A transport failure: timed out, or no (complete) answer. The text is reqwest's and
/// hyper's, without the URL (which holds no token, but needs no repeating either).
fn transport_error(e: reqwest::Error) -> IdpError {
    if e.is_timeout() {
        return IdpError::Timeout;
    }
    if e.is_builder() {
        return IdpError::Unexpected(format!("cannot build the request: {}", chain(&e)));
    }
    IdpError::Unreachable(chain(&e.without_url()))
}

/// An error with its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The statuses every provider maps alike: 429 and 5xx, and redirects (not followed).
pub(crate) fn common_failure(reply: &Reply) -> Option<IdpError> {
    let status = reply.status;
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Some(IdpError::RateLimited);
    }
    if status.is_server_error() {
        return Some(IdpError::ServerError(status.as_u16()));
    }
    if status.is_redirection() {
        return Some(IdpError::Unexpected(format!(
            "HTTP {} redirect to {} (not followed: configure the URL it points to)",
            status.as_u16(),
            reply.location.as_deref().unwrap_or("nowhere")
        )));
    }
    None
}

/// Text from a provider's answer made safe for an error: each secret replaced (before
/// the cut, so that no part of one survives), cut to a readable length.
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "<redacted>");
    }
    text.chars().take(300).collect()
}

/// Reads an instant the way the providers write them (RFC 3339), accepting the space
/// separator some Appwrite versions documented.
pub(crate) fn parse_instant(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    crate::clock::parse_iso(text).or_else(|| crate::clock::parse_iso(&text.replacen(' ', "T", 1)))
}
