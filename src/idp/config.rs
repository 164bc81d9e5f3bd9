//! The identity-provider flags (SPEC §9), flattened into [`crate::Config`], and the
//! checks that clap's per-flag parsers cannot make.

use std::{fmt, path::PathBuf};

use clap::{Args, ValueEnum};

/// The environment variable that may hold the introspection client secret itself. It
/// is read from the environment only, never from a flag: a command line is visible to
/// every user of the machine (`ps`).
pub const CLIENT_SECRET_ENV: &str = "SESSION_CACHE_INTROSPECTION_CLIENT_SECRET";

/// Which identity provider Validate asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IdpKind {
    /// Appwrite's REST API: the account and current session of a session secret.
    Appwrite,
    /// RFC 7662 OAuth 2.0 token introspection.
    Introspection,
}

/// A secret that never shows in `Debug` output (the configuration is logged with it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How Validate reaches the identity provider (SPEC §9).
#[derive(Clone, Debug, Args)]
pub struct IdpFlags {
    /// Identity provider that Validate asks about tokens it has not cached: appwrite
    /// (needs --appwrite-endpoint and --appwrite-project) or introspection (RFC 7662;
    /// needs --introspection-url, --introspection-client-id and a client secret).
    /// Without it, Validate answers FAILED_PRECONDITION.
    #[arg(long = "idp", env = "SESSION_CACHE_IDP", value_enum)]
    pub idp: Option<IdpKind>,

    /// The longest one provider call may take, connecting included, in milliseconds;
    /// past it Validate answers UNAVAILABLE and caches nothing.
    #[arg(long, env = "SESSION_CACHE_IDP_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub idp_timeout_ms: u64,

    /// Most provider calls in flight at once. Past it a Validate (or an edge check)
    /// waits for a slot while its deadline (grpc-timeout, at most --request-timeout-ms)
    /// still leaves --idp-timeout-ms for the call, and answers UNAVAILABLE when it does
    /// not; while the provider keeps failing, it answers UNAVAILABLE at once.
    #[arg(long, env = "SESSION_CACHE_IDP_MAX_IN_FLIGHT", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub idp_max_in_flight: u32,

    /// Most provider calls (one per distinct token) that may wait for one of the
    /// --idp-max-in-flight slots at once; past it a new one answers UNAVAILABLE at once.
    /// 0: never wait.
    #[arg(long, env = "SESSION_CACHE_IDP_MAX_WAITING", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub idp_max_waiting: u32,

    /// How long a token the provider refused answers INVALID without asking again, in
    /// seconds (0: ask every time).
    #[arg(long, env = "SESSION_CACHE_NEGATIVE_TTL_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub negative_ttl_seconds: u32,

    /// PEM certificates to trust for the provider's TLS besides the system's roots (a
    /// private CA).
    #[arg(long, env = "SESSION_CACHE_IDP_CA_FILE")]
    pub idp_ca_file: Option<PathBuf>,

    /// Appwrite's API endpoint, with its version path: https://cloud.appwrite.io/v1 or
    /// https://appwrite.example.com/v1.
    #[arg(long, env = "SESSION_CACHE_APPWRITE_ENDPOINT")]
    pub appwrite_endpoint: Option<String>,

    /// The Appwrite project ID the sessions belong to (sent as X-Appwrite-Project).
    #[arg(long, env = "SESSION_CACHE_APPWRITE_PROJECT")]
    pub appwrite_project: Option<String>,

    /// The key of the user's Appwrite preferences (prefs) that holds the user's tier;
    /// a user without it gets an empty tier.
    #[arg(long, env = "SESSION_CACHE_APPWRITE_TIER_PREF", default_value = "tier")]
    pub appwrite_tier_pref: String,

    /// The RFC 7662 introspection endpoint (https://idp.example.com/oauth2/introspect).
    /// Redirects are not followed.
    #[arg(long, env = "SESSION_CACHE_INTROSPECTION_URL")]
    pub introspection_url: Option<String>,

    /// The client ID the service authenticates to the introspection endpoint with
    /// (HTTP Basic, RFC 6749 §2.3.1).
    #[arg(long, env = "SESSION_CACHE_INTROSPECTION_CLIENT_ID")]
    pub introspection_client_id: Option<String>,

    /// File holding the introspection client secret (trailing newline ignored). The
    /// secret may instead be given in the environment variable
    /// SESSION_CACHE_INTROSPECTION_CLIENT_SECRET, never on the command line.
    #[arg(long, env = "SESSION_CACHE_INTROSPECTION_CLIENT_SECRET_FILE")]
    pub introspection_client_secret_file: Option<PathBuf>,

    /// The claim of the introspection response that holds the user's tier (a string);
    /// a token without it gets an empty tier.
    #[arg(
        long,
        env = "SESSION_CACHE_INTROSPECTION_TIER_CLAIM",
        default_value = "tier"
    )]
    pub introspection_tier_claim: String,

    /// The secret from SESSION_CACHE_INTROSPECTION_CLIENT_SECRET, read when the flags
    /// are parsed; no flag sets it.
    #[arg(skip = std::env::var(CLIENT_SECRET_ENV).ok().filter(|s| !s.is_empty()).map(Secret))]
    pub introspection_client_secret: Option<Secret>,
}

impl IdpFlags {
    /// The provider call timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.idp_timeout_ms)
    }

    /// Checks that the provider flags fit together; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let appwrite = [
            (self.appwrite_endpoint.is_some(), "--appwrite-endpoint"),
            (self.appwrite_project.is_some(), "--appwrite-project"),
        ];
        let introspection = [
            (self.introspection_url.is_some(), "--introspection-url"),
            (
                self.introspection_client_id.is_some(),
                "--introspection-client-id",
            ),
            (
                self.introspection_client_secret_file.is_some(),
                "--introspection-client-secret-file",
            ),
            (
                self.introspection_client_secret.is_some(),
                CLIENT_SECRET_ENV,
            ),
        ];
        let given = |flags: &[(bool, &'static str)]| {
            flags
                .iter()
                .find(|(given, _)| *given)
                .map(|(_, flag)| *flag)
        };
        let Some(kind) = self.idp else {
            let shared = [(self.idp_ca_file.is_some(), "--idp-ca-file")];
            if let Some(flag) = given(&appwrite)
                .or_else(|| given(&introspection))
                .or_else(|| given(&shared))
            {
                return Err(format!(
                    "{flag} needs --idp: give --idp appwrite or --idp introspection"
                ));
            }
            return Ok(());
        };
        match kind {
            IdpKind::Appwrite => {
                if let Some(flag) = given(&introspection) {
                    return Err(format!("{flag} is for --idp introspection, not appwrite"));
                }
                let endpoint = self.appwrite_endpoint.as_deref().ok_or(
                    "--idp appwrite needs --appwrite-endpoint (https://cloud.appwrite.io/v1)",
                )?;
                check_url("--appwrite-endpoint", endpoint, false)?;
                let project = self.appwrite_project.as_deref().unwrap_or_default();
                if project.is_empty() {
                    return Err("--idp appwrite needs --appwrite-project (the project ID)".into());
                }
                // Appwrite IDs: a-z, A-Z, 0-9, '.', '-', '_' (its custom-ID rule).
                if !project
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return Err(
                        "--appwrite-project is not an Appwrite project ID (letters, \
                                digits, '.', '-' and '_')"
                            .into(),
                    );
                }
                if self.appwrite_tier_pref.is_empty() {
                    return Err("--appwrite-tier-pref must name a preference key".into());
                }
            }
            IdpKind::Introspection => {
                if let Some(flag) = given(&appwrite) {
                    return Err(format!("{flag} is for --idp appwrite, not introspection"));
                }
                let url = self
                    .introspection_url
                    .as_deref()
                    .ok_or("--idp introspection needs --introspection-url")?;
                check_url("--introspection-url", url, false)?;
                if self
                    .introspection_client_id
                    .as_deref()
                    .is_none_or(|id| id.is_empty())
                {
                    return Err("--idp introspection needs --introspection-client-id".into());
                }
                match (
                    &self.introspection_client_secret_file,
                    &self.introspection_client_secret,
                ) {
                    (None, None) => {
                        return Err(format!(
                            "--idp introspection needs --introspection-client-secret-file \
                             (or the secret in {CLIENT_SECRET_ENV})"
                        ));
                    }
                    (Some(_), Some(_)) => {
                        return Err(format!(
                            "--introspection-client-secret-file and {CLIENT_SECRET_ENV} both \
                             give the client secret: give one"
                        ));
                    }
                    _ => {}
                }
                if self.introspection_tier_claim.is_empty() {
                    return Err("--introspection-tier-claim must name a claim".into());
                }
            }
        }
        Ok(())
    }
}

/// An http:// or https:// URL with a host and no credentials (a query or fragment only
/// where the URL is taken as written, `query_ok`). The message never repeats the URL,
/// which might carry a password.
pub(crate) fn check_url(flag: &str, text: &str, query_ok: bool) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| format!("{flag} is not a URL ({e}); give https://host[:port]/path"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{flag} must be an http:// or https:// URL with a host"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{flag} must not carry credentials: they would show in logs"
        ));
    }
    if !query_ok && (url.query().is_some() || url.fragment().is_some()) {
        return Err(format!("{flag} must not have a query or fragment"));
    }
    Ok(url)
}
