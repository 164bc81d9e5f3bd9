//! `POST /backchannel-logout`: OpenID Connect Back-Channel Logout 1.0. The provider
//! posts a form with a `logout_token`, a JWT it signed, when a session ends; the token
//! is validated as the specification's §2.6 says, and its user revoked.
//!
//! - Signature: by a key of the provider's set ([`super::jwks`]) fit for the header's
//!   `alg`: RSA (RS256/384/512, PS256/384/512), EC (ES256 on P-256, ES384 on P-384) or
//!   Ed25519 (EdDSA). `none`, HMAC algorithms (a key the provider would share), a key of
//!   another type or curve, and encrypted tokens are refused.
//! - Claims: `iss` is `--oidc-issuer`; `aud` includes `--oidc-audience`; `iat` is within
//!   the leeway of now (`--clock-skew-ms` plus [`ALLOWANCE`]), and `exp`, when present,
//!   not past by more; `events` has the back-channel logout member; `sub` or `sid` is
//!   present; `nonce` is not; `jti` was not received before while the token could still
//!   be accepted (remembered for twice the leeway, at most [`MAX_JTIS`] of them).
//! - `sub`: that user is revoked. `sid` alone: the user Validate recorded for that
//!   session id from an introspection answer; else 400.
//!
//! Answers (§2.8), all `Cache-Control: no-store`: 200 once the store acknowledged the
//! revocation; 400 with `{"error": "invalid_request", "error_description": ...}` for any
//! refused token (nothing changed); 503 when the keys or the store could not be had
//! (nothing claimed; the provider may deliver again).

use std::{future::Future, pin::Pin, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL};
use http::{HeaderValue, Method, StatusCode, header};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use moka::{policy::EvictionPolicy, sync::Cache};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tracing::debug;

use super::{
    Revoker,
    jwks::{Jwks, KeyError},
    metrics::{self, Outcome},
    user_id_ok,
};
use crate::{
    http::{HttpRequest, HttpResponse, Route, respond, respond_json},
    keys::TokenHasher,
    store::Store,
};

/// The metrics `source` label.
const SOURCE: &str = "backchannel";
/// The member of `events` that makes a JWT a logout token (§2.4).
pub(super) const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// How far `iat` may be from now, and `exp` past, besides `--clock-skew-ms`: the time a
/// provider may take to deliver.
pub(super) const ALLOWANCE: Duration = Duration::from_secs(60);
/// Most `jti`s remembered; past it the least recently seen are forgotten (a replay of
/// one only revokes its user again).
pub(super) const MAX_JTIS: u64 = 100_000;
/// Most keys tried for a token whose header names no key ID.
const MAX_CANDIDATES: usize = 8;
/// The algorithms a logout token may be signed with: the provider's private key only.
const ACCEPTED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What the flags say about the provider.
pub(super) struct Settings {
    issuer: String,
    audience: String,
    jwks: Jwks,
    leeway: Duration,
    /// SHA-256 of each `jti` accepted, while its token could still be accepted.
    seen: Cache<[u8; 32], ()>,
}

impl Settings {
    pub(super) fn new(issuer: String, audience: String, jwks: Jwks, clock_skew: Duration) -> Self {
        let leeway = clock_skew + ALLOWANCE;
        Settings {
            issuer,
            audience,
            jwks,
            leeway,
            // A token is accepted while its `iat` is within the leeway of now, and `iat`
            // is at most the leeway ahead when it is: twice the leeway covers it.
            seen: Cache::builder()
                .max_capacity(MAX_JTIS)
                .time_to_live(2 * leeway + Duration::from_secs(1))
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }
}

/// Why a token is not carried out.
#[derive(Debug)]
enum Refusal {
    /// 400: the token is not a valid logout token for this service.
    Invalid(String),
    /// 503: the keys or the store could not be had.
    Unavailable(String),
}

/// What a valid token asks.
struct Logout {
    sub: Option<String>,
    sid: Option<String>,
    jti: [u8; 32],
}

/// The route.
pub(super) struct Backchannel<S> {
    settings: Settings,
    revoker: Revoker<S>,
    hasher: TokenHasher,
}

impl<S: Store> Backchannel<S> {
    pub(super) fn new(settings: Settings, revoker: Revoker<S>, hasher: TokenHasher) -> Self {
        Backchannel {
            settings,
            revoker,
            hasher,
        }
    }

    async fn answer(&self, request: HttpRequest) -> Result<(), Refusal> {
        let form = request
            .head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form {
            return Err(Refusal::Invalid(
                "body: not a form (Content-Type: application/x-www-form-urlencoded)".into(),
            ));
        }
        let tokens: Vec<_> = form_urlencoded::parse(&request.body)
            .filter(|(name, _)| name == "logout_token")
            .map(|(_, value)| value)
            .collect();
        let [token] = tokens.as_slice() else {
            return Err(Refusal::Invalid("logout_token: required, once".into()));
        };
        let logout = self.validate(token).await?;
        let user = match (&logout.sub, &logout.sid) {
            (Some(sub), _) => sub.clone(),
            (None, Some(sid)) => {
                match self
                    .revoker
                    .store
                    .session_user(&self.hasher.hash(sid))
                    .await
                {
                    Ok(Some(user)) => user,
                    Ok(None) => {
                        return Err(Refusal::Invalid(
                            "sid: no user is known for this session (only sessions seen in \
                             introspection answers that carry sid are); send sub"
                                .into(),
                        ));
                    }
                    Err(e) => {
                        return Err(Refusal::Unavailable(format!(
                            "the store could not say whose session it is: {e}"
                        )));
                    }
                }
            }
            (None, None) => return Err(Refusal::Invalid("sub or sid: required".into())),
        };
        if !user_id_ok(&user) {
            return Err(Refusal::Invalid(format!(
                "sub: must be 1 to {} bytes",
                crate::service::MAX_USER_ID_BYTES
            )));
        }
        self.revoker.revoke(&user, SOURCE).await.map_err(|e| {
            Refusal::Unavailable(format!("the store did not acknowledge the revocation: {e}"))
        })?;
        // Remembered only once carried out: a delivery answered 503 may come again.
        self.settings.seen.insert(logout.jti, ());
        Ok(())
    }

    /// §2.6: the signature, then the claims.
    async fn validate(&self, token: &str) -> Result<Logout, Refusal> {
        let invalid = |why: String| Refusal::Invalid(format!("logout_token: {why}"));
        let parts = token.split('.').count();
        if parts == 5 {
            return Err(invalid(
                "encrypted (JWE); configure the provider to sign logout tokens without \
                 encrypting them"
                    .into(),
            ));
        }
        if parts != 3 {
            return Err(invalid("not a JWT (three base64url parts)".into()));
        }
        let alg = header_alg(token).map_err(invalid)?;
        if alg == "none" {
            return Err(invalid(
                "header: alg none is refused: a logout token must be signed".into(),
            ));
        }
        if alg.starts_with("HS") {
            return Err(invalid(format!(
                "header: alg {alg} (HMAC) is refused: a logout token must be signed with the \
                 provider's key"
            )));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("header: {e}")))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(invalid(format!("header: alg {alg} is not accepted")));
        }
        let kid = header.kid.as_deref();
        let candidates = match self.settings.jwks.candidates(kid).await {
            Ok(keys) => keys,
            Err(KeyError::Unknown) => {
                return Err(invalid(match kid {
                    Some(kid) => format!(
                        "header: kid {:?} is not a key of the provider's set (fetched again)",
                        kid.chars().take(64).collect::<String>()
                    ),
                    None => "the provider's set has no key".into(),
                }));
            }
            Err(KeyError::Unavailable(why)) => {
                return Err(Refusal::Unavailable(format!(
                    "the provider's keys cannot be had: {why}"
                )));
            }
        };
        let mut keys = Vec::new();
        for jwk in &candidates {
            match fits(jwk, header.alg) {
                Ok(()) => keys.push(jwk),
                // A key named by its ID that does not fit: the token is refused.
                Err(why) if kid.is_some() => return Err(invalid(format!("key: {why}"))),
                Err(_) => {}
            }
        }
        if keys.is_empty() {
            return Err(invalid(format!(
                "no key of the provider's set fits alg {alg}"
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["iss", "aud"]);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.leeway = self.settings.leeway.as_secs();
        let mut claims = None;
        for jwk in keys.into_iter().take(MAX_CANDIDATES) {
            let key =
                DecodingKey::from_jwk(jwk).map_err(|e| invalid(format!("key: unusable: {e}")))?;
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => {}
                Err(e) => return Err(invalid(describe(&e))),
            }
        }
        let claims = claims
            .ok_or_else(|| invalid("signature: does not verify with the provider's key".into()))?;
        self.check_claims(&claims).map_err(invalid)
    }

    /// The claims that the JWT library does not check, as §2.4 and §2.6 say.
    fn check_claims(&self, claims: &Map<String, Value>) -> Result<Logout, String> {
        let leeway = self.settings.leeway.as_secs_f64();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if claims.get("iss").and_then(Value::as_str) != Some(self.settings.issuer.as_str()) {
            return Err("iss: not --oidc-issuer".into());
        }
        let iat = claims
            .get("iat")
            .and_then(Value::as_f64)
            .ok_or("iat: required, a NumericDate")?;
        if iat > now + leeway {
            return Err(format!("iat: more than {leeway} s in the future"));
        }
        if iat < now - leeway {
            return Err(format!("iat: more than {leeway} s ago"));
        }
        if let Some(exp) = claims.get("exp") {
            let exp = exp.as_f64().ok_or("exp: not a NumericDate")?;
            if exp + leeway < now {
                return Err("exp: expired".into());
            }
        }
        let events = claims
            .get("events")
            .and_then(Value::as_object)
            .ok_or("events: required, a JSON object")?;
        if !events.get(BACKCHANNEL_EVENT).is_some_and(Value::is_object) {
            return Err(format!("events: no {BACKCHANNEL_EVENT} member"));
        }
        if claims.contains_key("nonce") {
            return Err("nonce: a logout token must not carry one".into());
        }
        let text = |name: &str| -> Result<Option<String>, String> {
            match claims.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(_) => Err(format!("{name}: not a non-empty string")),
            }
        };
        let (sub, sid) = (text("sub")?, text("sid")?);
        if sub.is_none() && sid.is_none() {
            return Err("sub or sid: required".into());
        }
        let jti = text("jti")?.ok_or("jti: required")?;
        let jti: [u8; 32] = Sha256::digest(jti.as_bytes()).into();
        if self.settings.seen.contains_key(&jti) {
            return Err("jti: this logout token was already received".into());
        }
        Ok(Logout { sub, sid, jti })
    }
}

impl<S: Store> Route for Backchannel<S> {
    fn path(&self) -> &'static str {
        "/backchannel-logout"
    }

    fn statuses(&self) -> &'static [u16] {
        &[200, 400, 405, 503]
    }

    fn handle(
        &self,
        request: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = HttpResponse> + Send + '_>> {
        Box::pin(async move {
            if request.head.method != Method::POST {
                let mut response = respond_json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &json!({ "error": "invalid_request", "error_description": "method: POST only" }),
                );
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                metrics::delivery(SOURCE, Outcome::Refused);
                return no_store(response);
            }
            let (response, outcome) = match self.answer(request).await {
                Ok(()) => (respond(StatusCode::OK, "text/plain", ""), Outcome::Revoked),
                Err(Refusal::Invalid(why)) => {
                    debug!(why, "a logout token was refused");
                    (
                        respond_json(
                            StatusCode::BAD_REQUEST,
                            &json!({ "error": "invalid_request", "error_description": why }),
                        ),
                        Outcome::Refused,
                    )
                }
                Err(Refusal::Unavailable(why)) => {
                    debug!(why, "a logout token could not be carried out");
                    (
                        respond_json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &json!({ "error": "temporarily_unavailable", "error_description": why }),
                        ),
                        Outcome::Unavailable,
                    )
                }
            };
            metrics::delivery(SOURCE, outcome);
            no_store(response)
        })
    }
}

fn no_store(mut response: HttpResponse) -> HttpResponse {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The header's `alg` as written, read before the JWT library parses the header, so
/// that `none` and HMAC get their own answer.
fn header_alg(token: &str) -> Result<String, String> {
    let encoded = token.split('.').next().unwrap_or_default();
    let bytes = BASE64URL
        .decode(encoded.trim_end_matches('='))
        .map_err(|_| "header: not base64url".to_owned())?;
    let header: Value =
        serde_json::from_slice(&bytes).map_err(|_| "header: not JSON".to_owned())?;
    match header.get("alg") {
        Some(Value::String(alg)) => Ok(alg.clone()),
        _ => Err("header: alg: required, a string".into()),
    }
}

/// Whether `jwk` can verify a signature by `alg`; `Err` says why not.
fn fits(jwk: &Jwk, alg: Algorithm) -> Result<(), String> {
    let name = jwk.common.key_id.as_deref().unwrap_or("without an ID");
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err(format!("key {name} is for encryption, not signatures"));
    }
    if let Some(declared) = jwk.common.key_algorithm
        && Algorithm::try_from(declared).ok() != Some(alg)
    {
        return Err(format!(
            "key {name} is for {declared:?}; the token says {alg:?}"
        ));
    }
    let fit = match (&jwk.algorithm, alg.family()) {
        (AlgorithmParameters::RSA(_), AlgorithmFamily::Rsa) => true,
        (AlgorithmParameters::EllipticCurve(ec), AlgorithmFamily::Ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        (AlgorithmParameters::OctetKeyPair(okp), AlgorithmFamily::Ed) => {
            okp.curve == EllipticCurve::Ed25519
        }
        _ => false,
    };
    if fit {
        Ok(())
    } else {
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => "an RSA key".to_owned(),
            AlgorithmParameters::EllipticCurve(ec) => format!("an EC key on {:?}", ec.curve),
            AlgorithmParameters::OctetKeyPair(okp) => format!("an OKP key on {:?}", okp.curve),
            AlgorithmParameters::OctetKey(_) => "a symmetric key".to_owned(),
            _ => "a key of an unknown type".to_owned(),
        };
        Err(format!("key {name} is {kind}; the token says {alg:?}"))
    }
}

/// A JWT library error as a refusal's reason.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        ErrorKind::InvalidIssuer => "iss: not --oidc-issuer".into(),
        ErrorKind::InvalidAudience => "aud: does not include --oidc-audience".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("{claim}: required"),
        ErrorKind::InvalidClaimFormat(claim) => format!("{claim}: not of the right type"),
        ErrorKind::InvalidAlgorithm => "header: alg does not fit the key".into(),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => format!("not a JWT: {e}"),
        _ => format!("cannot be verified: {e}"),
    }
}
