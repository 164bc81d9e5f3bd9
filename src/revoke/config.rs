//! The flags of the pushed revocations (SPEC §12), flattened into [`crate::Config`], and
//! the checks that clap's per-flag parsers cannot make.

use std::path::PathBuf;

use clap::Args;

/// Which revocations the identity provider may push, and how each is authenticated.
#[derive(Clone, Debug, Args)]
pub struct RevokeFlags {
    /// File holding the signature key of the Appwrite webhook (shown on the webhook's
    /// page in the Appwrite console; trailing newline ignored). With
    /// --appwrite-webhook-url it turns on POST /webhooks/appwrite on --http-listen,
    /// where Appwrite's user events revoke the user. Read before binding, never logged.
    #[arg(long, env = "SESSION_CACHE_APPWRITE_WEBHOOK_KEY_FILE")]
    pub appwrite_webhook_key_file: Option<PathBuf>,

    /// The webhook's URL exactly as entered in Appwrite
    /// (https://cache.example.com:8080/webhooks/appwrite): Appwrite signs it with each
    /// body, so any difference (scheme, host, port, path, a trailing slash) fails every
    /// signature.
    #[arg(long, env = "SESSION_CACHE_APPWRITE_WEBHOOK_URL")]
    pub appwrite_webhook_url: Option<String>,

    /// The OpenID provider's issuer, exactly as its logout tokens carry it in `iss`
    /// (https://keycloak.example.com/realms/main). With --oidc-audience and
    /// --oidc-jwks-url it turns on POST /backchannel-logout on --http-listen (OpenID
    /// Connect Back-Channel Logout 1.0).
    #[arg(long, env = "SESSION_CACHE_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,

    /// The client ID the provider sends logout tokens for: their `aud` must include it.
    #[arg(long, env = "SESSION_CACHE_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,

    /// The provider's JSON Web Key Set (the `jwks_uri` of its discovery document),
    /// fetched when a logout token needs a key: again on an unknown key ID, at most once
    /// every 5 seconds, so keys rotate without a restart. Fetched with
    /// --idp-timeout-ms, trusting --idp-ca-file besides the system's roots.
    #[arg(long, env = "SESSION_CACHE_OIDC_JWKS_URL")]
    pub oidc_jwks_url: Option<String>,
}

impl RevokeFlags {
    /// Whether Appwrite webhooks are served.
    pub fn appwrite_webhooks(&self) -> bool {
        self.appwrite_webhook_key_file.is_some()
    }

    /// Whether back-channel logout is served.
    pub fn backchannel_logout(&self) -> bool {
        self.oidc_issuer.is_some()
    }

    /// Checks that the flags fit together (`http_listen`: whether --http-listen is
    /// given); the message names the flag.
    pub fn validate(&self, http_listen: bool) -> Result<(), String> {
        match (&self.appwrite_webhook_key_file, &self.appwrite_webhook_url) {
            (Some(_), None) => {
                return Err("--appwrite-webhook-key-file needs --appwrite-webhook-url \
                            (the webhook's URL exactly as entered in Appwrite)"
                    .into());
            }
            (None, Some(_)) => {
                return Err("--appwrite-webhook-url needs --appwrite-webhook-key-file \
                            (the webhook's signature key)"
                    .into());
            }
            (Some(_), Some(url)) => {
                check_url("--appwrite-webhook-url", url, true)?;
            }
            (None, None) => {}
        }
        let oidc = [
            (self.oidc_issuer.is_some(), "--oidc-issuer"),
            (self.oidc_audience.is_some(), "--oidc-audience"),
            (self.oidc_jwks_url.is_some(), "--oidc-jwks-url"),
        ];
        if oidc.iter().any(|(given, _)| *given) {
            if let Some((_, missing)) = oidc.iter().find(|(given, _)| !*given) {
                return Err(format!(
                    "back-channel logout needs --oidc-issuer, --oidc-audience and \
                     --oidc-jwks-url: {missing} is missing"
                ));
            }
            if self.oidc_issuer.as_deref().is_some_and(str::is_empty) {
                return Err("--oidc-issuer must not be empty".into());
            }
            if self.oidc_audience.as_deref().is_some_and(str::is_empty) {
                return Err("--oidc-audience must not be empty".into());
            }
            check_url(
                "--oidc-jwks-url",
                self.oidc_jwks_url.as_deref().unwrap_or_default(),
                false,
            )?;
        }
        if !http_listen {
            let needs = [
                (self.appwrite_webhooks(), "--appwrite-webhook-key-file"),
                (self.backchannel_logout(), "--oidc-issuer"),
            ];
            if let Some((_, flag)) = needs.iter().find(|(given, _)| *given) {
                return Err(format!(
                    "{flag} needs --http-listen: the identity provider pushes revocations \
                     over HTTP"
                ));
            }
        }
        Ok(())
    }
}

/// An http:// or https:// URL with a host and no credentials (a query is allowed only
/// where the URL is taken as written, `query_ok`). The message never repeats the URL.
fn check_url(flag: &str, text: &str, query_ok: bool) -> Result<(), String> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> RevokeFlags {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            flags: RevokeFlags,
        }
        <Wrapper as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .flags
    }

    /// Half a pair, a bad URL, or either feature without --http-listen is refused
    /// naming the flag; complete pairs pass.
    #[test]
    fn flags_fit_together() {
        let webhook = [
            "--appwrite-webhook-key-file",
            "k",
            "--appwrite-webhook-url",
            "https://cache.example.com/webhooks/appwrite?x=1",
        ];
        let oidc = [
            "--oidc-issuer",
            "https://idp.example.com/realms/main",
            "--oidc-audience",
            "cache",
            "--oidc-jwks-url",
            "https://idp.example.com/certs",
        ];
        assert_eq!(flags(&webhook).validate(true), Ok(()));
        assert_eq!(flags(&oidc).validate(true), Ok(()));
        let cases: &[(&[&str], bool, &str)] = &[
            (&webhook[..2], true, "--appwrite-webhook-url"),
            (&webhook[2..], true, "--appwrite-webhook-key-file"),
            (&webhook, false, "--http-listen"),
            (&oidc, false, "--http-listen"),
            (&oidc[..4], true, "--oidc-jwks-url"),
            (&oidc[2..], true, "--oidc-issuer"),
            (
                &[
                    "--appwrite-webhook-key-file",
                    "k",
                    "--appwrite-webhook-url",
                    "cache/webhooks",
                ],
                true,
                "--appwrite-webhook-url",
            ),
            (
                &[
                    "--oidc-issuer",
                    "i",
                    "--oidc-audience",
                    "a",
                    "--oidc-jwks-url",
                    "https://u:secret@idp/certs",
                ],
                true,
                "--oidc-jwks-url",
            ),
        ];
        for (args, http, flag) in cases {
            let error = flags(args).validate(*http).unwrap_err();
            assert!(error.contains(flag), "{args:?}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }
}
