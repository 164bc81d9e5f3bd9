//! Validation at the edge (SPEC §11): proxies ask the cache about each request before it
//! reaches a service, so that no service writes caller code. Envoy and Istio call
//! `envoy.service.auth.v3.Authorization/Check` ([`check`]); nginx `auth_request`,
//! Traefik `ForwardAuth` and Caddy `forward_auth` call `/auth` on the HTTP listener
//! ([`auth`]). Both decide with Validate's decision (`crate::decision`).
//!
//! What they share lives here: where the token is found ([`Extractor`]: `authorization:
//! Bearer`, then the Appwrite session cookie, then the headers and cookies the flags
//! name), the identity headers the upstream receives ([`Identity`], oauth2-proxy's
//! `x-auth-request-*` names by default), and the flags.
//!
//! A client must never reach the upstream posing as a user: every identity header is
//! set by the answer (overwriting the client's), and the client's other headers under
//! the prefix are removed (Check) or overwritten by the proxy's copy rules (`/auth`,
//! which therefore answers every identity header, empty when unknown).

pub mod auth;
pub mod check;

use std::{borrow::Cow, sync::Arc};

use chrono::SecondsFormat;
use clap::Args;

use crate::{auth::Current as Keys, decision::Decider, entry::Session, store::Store};

pub use check::{CheckService, EdgeSettings};

/// Check and `/auth`, built from the configuration over Validate's decision.
pub(crate) struct Edge<S> {
    decider: Decider<S>,
    settings: Arc<EdgeSettings>,
    keys: Keys,
    api_key_header: String,
}

impl<S: Store> Edge<S> {
    /// The edge paths of `flags`, deciding with `decider`; `appwrite_project` names
    /// the Appwrite session cookie (`--idp appwrite`). `/auth` checks its callers
    /// against `keys` (Check's are checked by the call layer).
    pub(crate) fn new(
        flags: &EdgeFlags,
        appwrite_project: Option<&str>,
        decider: Decider<S>,
        keys: Keys,
    ) -> Self {
        Edge {
            decider,
            settings: Arc::new(EdgeSettings {
                extractor: Extractor::new(flags, appwrite_project),
                identity: Identity::new(&flags.edge_header_prefix),
                strip_credentials: flags.edge_strip_credentials,
            }),
            keys,
            api_key_header: flags.edge_api_key_header.clone(),
        }
    }

    /// `envoy.service.auth.v3.Authorization`, for the gRPC listener.
    pub(crate) fn check_server(
        &self,
    ) -> envoy_pb::envoy::service::auth::v3::authorization_server::AuthorizationServer<
        CheckService<S>,
    > {
        envoy_pb::envoy::service::auth::v3::authorization_server::AuthorizationServer::new(
            CheckService::new(self.decider.clone(), self.settings.clone()),
        )
    }

    /// `/auth`, for the HTTP listener.
    pub(crate) fn auth_route(&self) -> Arc<dyn crate::http::Route> {
        Arc::new(auth::AuthRoute::new(
            self.decider.clone(),
            self.settings.clone(),
            self.keys.clone(),
            &self.api_key_header,
        ))
    }
}

/// Envoy's external authorization API v3 and the packages it imports, compiled from
/// `third_party/envoy-api/` by `build.rs`.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod envoy_pb {
    include!(concat!(env!("OUT_DIR"), "/envoy_api.rs"));

    /// The encoded descriptors of Envoy's `envoy.service.auth.v3` and its imports, for
    /// server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/envoy_auth_descriptor.bin"));
}

/// The `grpc.health.v1` name of `Check`, which follows the store like
/// `sessioncache.v1.SessionCache` (SPEC §11).
pub const HEALTH_NAME: &str = "envoy.service.auth.v3.Authorization";

/// Most cookies looked through for the token, over all `cookie` headers; a request
/// with more is denied rather than scanned without end.
pub const MAX_COOKIES: usize = 1000;

/// How the edge checks find tokens and name identity headers (SPEC §11), flattened
/// into [`crate::Config`].
#[derive(Clone, Debug, Args)]
pub struct EdgeFlags {
    /// Prefix of the identity headers that an allowed request carries to the upstream:
    /// <prefix>user, email, name, email-verified, tier, session-expire. The default is
    /// oauth2-proxy's, so nginx snippets written for it carry over. A client's own
    /// headers under this prefix never reach the upstream through Check.
    #[arg(long, env = "SESSION_CACHE_EDGE_HEADER_PREFIX", default_value = "x-auth-request-",
          value_parser = parse_prefix)]
    pub edge_header_prefix: String,

    /// Check also removes the token's header (or cookie) from the request, so that the
    /// upstream never sees the session secret. For /auth the proxy's configuration
    /// does this (docs/edge.md shows how for each proxy).
    #[arg(long, env = "SESSION_CACHE_EDGE_STRIP_CREDENTIALS", action = clap::ArgAction::SetTrue)]
    pub edge_strip_credentials: bool,

    /// Headers whose whole value is a token, looked at (in this order) after
    /// `authorization: Bearer` and the Appwrite session cookie (comma-separated).
    #[arg(long, env = "SESSION_CACHE_EDGE_TOKEN_HEADER", value_delimiter = ',',
          value_parser = parse_header_name)]
    pub edge_token_header: Vec<String>,

    /// Cookies whose value is a token, looked at (in this order) after the headers of
    /// --edge-token-header (comma-separated).
    #[arg(long, env = "SESSION_CACHE_EDGE_TOKEN_COOKIE", value_delimiter = ',',
          value_parser = parse_cookie_name)]
    pub edge_token_cookie: Vec<String>,

    /// The header of an /auth request that carries the proxy's own API key (the raw
    /// key, no "Bearer"), when --api-keys-file is given: `authorization` carries the
    /// user's token there. A client certificate mapped in the keys file also serves.
    #[arg(long, env = "SESSION_CACHE_EDGE_API_KEY_HEADER", default_value = "x-session-cache-key",
          value_parser = parse_header_name)]
    pub edge_api_key_header: String,
}

fn parse_header_name(text: &str) -> Result<String, String> {
    let name = text.trim().to_ascii_lowercase();
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{text:?} is not an HTTP header name"))?;
    if matches!(name.as_str(), "cookie" | "authorization") {
        return Err(format!(
            "{name:?} is always looked at (Bearer, and the cookies of --edge-token-cookie)"
        ));
    }
    Ok(name)
}

fn parse_prefix(text: &str) -> Result<String, String> {
    let prefix = text.trim().to_ascii_lowercase();
    if prefix.len() < 2 || http::HeaderName::from_bytes(format!("{prefix}user").as_bytes()).is_err()
    {
        return Err(format!(
            "{text:?} cannot start HTTP header names (x-auth-request-, say)"
        ));
    }
    Ok(prefix)
}

fn parse_cookie_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    // RFC 6265 §4.1.1: a cookie name is an RFC 7230 token.
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(format!("{text:?} is not a cookie name"));
    }
    Ok(name.to_owned())
}

/// Where a token was found: what `--edge-strip-credentials` removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carrier {
    /// `authorization: Bearer <token>`.
    Bearer,
    /// A header of `--edge-token-header`.
    Header(String),
    /// A cookie (the Appwrite session cookie, or one of `--edge-token-cookie`).
    Cookie(String),
}

/// What a request carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a> {
    Token {
        token: Cow<'a, str>,
        carrier: Carrier,
    },
    /// No token anywhere the service looks.
    Nothing,
    /// Something that should have been a token and cannot be one; the reason names the
    /// header and never quotes it.
    Malformed(&'static str),
}

/// A request's headers, as the two edge paths receive them: Envoy's map of merged
/// headers (or its raw list), or the HTTP request's own.
pub trait Headers {
    /// Every value of the header `name` (lowercase), as sent.
    fn values(&self, name: &str) -> Vec<&[u8]>;
}

impl Headers for http::HeaderMap {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.get_all(name).iter().map(|v| v.as_bytes()).collect()
    }
}

/// Where tokens are looked for, in order (SPEC §11).
#[derive(Clone, Debug)]
pub struct Extractor {
    /// `a_session_<project>`, with `--idp appwrite`.
    appwrite: Vec<String>,
    headers: Vec<String>,
    cookies: Vec<String>,
}

impl Extractor {
    /// From the flags: the Appwrite session cookie first when the provider is Appwrite
    /// (`a_session_<project>`), then `--edge-token-header`, then `--edge-token-cookie`.
    pub fn new(flags: &EdgeFlags, appwrite_project: Option<&str>) -> Extractor {
        Extractor {
            appwrite: appwrite_project
                .map(|project| format!("a_session_{project}"))
                .into_iter()
                .collect(),
            headers: flags.edge_token_header.clone(),
            cookies: flags.edge_token_cookie.clone(),
        }
    }

    /// The token a request carries, looked for in order: the first place that holds
    /// one decides (a malformed `Bearer` is a denial, not a reason to look further).
    pub fn find<'a>(&self, headers: &'a dyn Headers) -> Found<'a> {
        match bearer(headers) {
            Found::Nothing => {}
            found => return found,
        }
        match cookie(headers, &self.appwrite) {
            Found::Nothing => {}
            found => return found,
        }
        for name in &self.headers {
            let values = headers.values(name);
            let Some(value) = values.iter().find(|v| !v.is_empty()) else {
                continue;
            };
            if values.len() > 1 {
                return Found::Malformed("a token header was sent more than once");
            }
            return match visible_ascii(value.trim_ascii()) {
                Some(token) => Found::Token {
                    token: Cow::Borrowed(token),
                    carrier: Carrier::Header(name.clone()),
                },
                None => Found::Malformed("a token header holds bytes no token has"),
            };
        }
        cookie(headers, &self.cookies)
    }
}

/// `authorization: Bearer <token>` (the scheme in any case, RFC 7235).
fn bearer(headers: &dyn Headers) -> Found<'_> {
    let values = headers.values("authorization");
    let Some(value) = values.first() else {
        return Found::Nothing;
    };
    let value = value.trim_ascii();
    let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
        Some(at) => (&value[..at], value[at..].trim_ascii()),
        None => (value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        // Basic or another scheme: the token may be elsewhere.
        return Found::Nothing;
    }
    if values.len() > 1 {
        return Found::Malformed("authorization: sent more than once");
    }
    if rest.is_empty() {
        return Found::Malformed("authorization: Bearer with no token");
    }
    match visible_ascii(rest) {
        Some(token) => Found::Token {
            token: Cow::Borrowed(token),
            carrier: Carrier::Bearer,
        },
        None => Found::Malformed("authorization: the token holds bytes no token has"),
    }
}

/// The first of `names` among the request's cookies, percent-decoded as the servers
/// that set them (Appwrite's PHP, most web frameworks) encode them.
fn cookie<'a>(headers: &'a dyn Headers, names: &[String]) -> Found<'a> {
    if names.is_empty() {
        return Found::Nothing;
    }
    let mut seen = 0;
    let mut found: Vec<Option<&'a [u8]>> = vec![None; names.len()];
    for header in headers.values("cookie") {
        for pair in header.split(|&b| b == b';') {
            seen += 1;
            if seen > MAX_COOKIES {
                return Found::Malformed("cookie: more than 1000 cookies");
            }
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (name, value) = (&pair[..eq], pair[eq + 1..].trim_ascii());
            if let Some(i) = names.iter().position(|n| n.as_bytes() == name)
                && found[i].is_none()
                && !value.is_empty()
            {
                found[i] = Some(value);
            }
        }
    }
    for (name, value) in names.iter().zip(found) {
        let Some(value) = value else { continue };
        // Quoted values (RFC 6265 allows DQUOTE *cookie-octet DQUOTE) lose their quotes.
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        let Some(text) = visible_ascii(value) else {
            return Found::Malformed("cookie: a session cookie holds bytes no token has");
        };
        let token = match percent_encoding::percent_decode_str(text).decode_utf8() {
            Ok(token) => token,
            Err(_) => return Found::Malformed("cookie: a session cookie is not UTF-8"),
        };
        return Found::Token {
            token,
            carrier: Carrier::Cookie(name.clone()),
        };
    }
    Found::Nothing
}

/// The bytes as text, if they are visible ASCII (what a token can hold).
fn visible_ascii(bytes: &[u8]) -> Option<&str> {
    if bytes.iter().all(|b| b.is_ascii_graphic()) {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// The identity headers (SPEC §11) under one prefix.
#[derive(Clone, Debug)]
pub struct Identity {
    prefix: String,
    names: [String; 6],
}

/// The identity headers' names after the prefix.
const FIELDS: [&str; 6] = [
    "user",
    "email",
    "name",
    "email-verified",
    "tier",
    "session-expire",
];

impl Identity {
    pub fn new(prefix: &str) -> Identity {
        Identity {
            prefix: prefix.to_owned(),
            names: FIELDS.map(|field| format!("{prefix}{field}")),
        }
    }

    /// The prefix, lowercase.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The header names, in a fixed order.
    pub fn names(&self) -> &[String; 6] {
        &self.names
    }

    /// Each identity header with its value for `session`, or empty without one.
    pub fn headers<'a>(&'a self, session: Option<&Session>) -> [(&'a str, String); 6] {
        let values = match session {
            Some(session) => {
                let user = &session.user;
                [
                    header_text(&user.id),
                    header_text(&user.email),
                    header_text(&user.name),
                    user.email_verified.to_string(),
                    header_text(&user.tier),
                    session
                        .session_expire
                        .to_rfc3339_opts(SecondsFormat::AutoSi, true),
                ]
            }
            None => Default::default(),
        };
        let mut values = values.into_iter();
        self.names
            .each_ref()
            .map(|name| (name.as_str(), values.next().unwrap_or_default()))
    }
}

/// A value made fit for a header: control characters (a newline in a user's name
/// would end the header, and a proxy would drop the whole header, leaving the
/// client's own value in place) become spaces; the rest, UTF-8 included, is kept.
fn header_text(text: &str) -> String {
    // The usual value needs no change: one copy, no scan of chars.
    if !text.bytes().any(|b| b.is_ascii_control()) && !text.contains(char::is_control) {
        return text.trim().to_owned();
    }
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> EdgeFlags {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            edge: EdgeFlags,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
            .edge
    }

    fn request(headers: &[(&str, &[u8])]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn token(found: Found<'_>) -> Option<(String, Carrier)> {
        match found {
            Found::Token { token, carrier } => Some((token.into_owned(), carrier)),
            _ => None,
        }
    }

    /// SPEC §11's order: Bearer, the Appwrite cookie, the named headers, the named
    /// cookies; the first place holding a token decides.
    #[test]
    fn finds_tokens_in_order() {
        let edge = Extractor::new(
            &flags(&[
                "--edge-token-header",
                "X-Session",
                "--edge-token-cookie",
                "sid,other",
            ]),
            Some("proj"),
        );
        let all: &[(&str, &[u8])] = &[
            ("authorization", b"Bearer from-bearer"),
            ("cookie", b"a=1; a_session_proj=from-appwrite; sid=from-sid"),
            ("x-session", b"from-header"),
        ];
        let find = |headers: &[(&str, &[u8])]| token(edge.find(&request(headers)));
        assert_eq!(find(all), Some(("from-bearer".into(), Carrier::Bearer)));
        assert_eq!(
            find(&all[1..]),
            Some((
                "from-appwrite".into(),
                Carrier::Cookie("a_session_proj".into())
            ))
        );
        assert_eq!(
            find(&[("cookie", b"sid=from-sid"), ("x-session", b"from-header")]),
            Some(("from-header".into(), Carrier::Header("x-session".into())))
        );
        assert_eq!(
            find(&[("cookie", b"x=1"), ("cookie", b"other=o; sid=from-sid")]),
            Some(("from-sid".into(), Carrier::Cookie("sid".into())))
        );
        // Basic is someone else's business: the cookie still counts.
        assert_eq!(
            find(&[
                ("authorization", b"Basic dXNlcjpwdw=="),
                ("cookie", b"a_session_proj=tok%3D%3D")
            ]),
            Some(("tok==".into(), Carrier::Cookie("a_session_proj".into())))
        );
        assert_eq!(
            find(&[("authorization", b"bEaReR   spaced ")]),
            Some(("spaced".into(), Carrier::Bearer))
        );
        assert_eq!(edge.find(&request(&[("cookie", b"a=b")])), Found::Nothing);
        assert_eq!(edge.find(&request(&[])), Found::Nothing);
    }

    /// Bad input is a named denial, never a token and never a panic: an empty Bearer,
    /// non-ASCII bytes, thousands of cookies, a token header twice.
    #[test]
    fn malformed_input_is_refused() {
        let edge = Extractor::new(&flags(&["--edge-token-header", "x-session"]), Some("proj"));
        type Case<'a> = (&'a [(&'a str, &'a [u8])], &'a str);
        let cases: &[Case<'_>] = &[
            (&[("authorization", b"Bearer")], "Bearer with no token"),
            (&[("authorization", b"Bearer    ")], "Bearer with no token"),
            (&[("authorization", b"Bearer t\xffk")], "authorization:"),
            (
                &[
                    ("authorization", b"Bearer a"),
                    ("authorization", b"Bearer b"),
                ],
                "more than once",
            ),
            (&[("cookie", b"a_session_proj=\xc3\xa9")], "cookie:"),
            (&[("cookie", b"a_session_proj=%ff")], "not UTF-8"),
            (
                &[("x-session", b"a"), ("x-session", b"b")],
                "more than once",
            ),
            (&[("x-session", b"t k")], "bytes no token has"),
        ];
        for (headers, reason) in cases {
            match edge.find(&request(headers)) {
                Found::Malformed(why) => assert!(why.contains(reason), "{headers:?}: {why}"),
                other => panic!("{headers:?}: {other:?}"),
            }
        }
        let many = (0..5000)
            .map(|i| format!("c{i}=v"))
            .collect::<Vec<_>>()
            .join("; ");
        assert_eq!(
            edge.find(&request(&[("cookie", many.as_bytes())])),
            Found::Malformed("cookie: more than 1000 cookies")
        );
    }

    /// Flags with names that cannot work are refused, naming the value.
    #[test]
    fn refuses_bad_flags() {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            edge: EdgeFlags,
        }
        for args in [
            &["--edge-token-header", "bad header"][..],
            &["--edge-token-header", "authorization"],
            &["--edge-token-cookie", "a;b"],
            &["--edge-header-prefix", "x auth"],
            &["--edge-api-key-header", ""],
        ] {
            let error = <Cli as clap::Parser>::try_parse_from(
                std::iter::once("t").chain(args.iter().copied()),
            )
            .unwrap_err()
            .to_string();
            assert!(error.contains(args[0]), "{args:?}: {error}");
        }
    }

    /// Every identity header is answered, empty without a session; values are fit
    /// for a header whatever the provider said.
    #[test]
    fn identity_headers() {
        let identity = Identity::new("x-auth-request-");
        let empty = identity.headers(None);
        assert_eq!(empty.len(), 6);
        assert!(empty.iter().all(|(_, v)| v.is_empty()));
        let session = Session {
            user: crate::entry::User {
                id: "u-1".into(),
                email: "ada@example.com".into(),
                name: "Ada\r\nX-Injected: 1".into(),
                email_verified: true,
                tier: "pro".into(),
                created_at: chrono::DateTime::UNIX_EPOCH,
                updated_at: chrono::DateTime::UNIX_EPOCH,
            },
            session_expire: chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap(),
        };
        let headers = identity.headers(Some(&session));
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("x-auth-request-user"), Some("u-1"));
        assert_eq!(get("x-auth-request-email-verified"), Some("true"));
        assert_eq!(get("x-auth-request-name"), Some("Ada  X-Injected: 1"));
        assert_eq!(
            get("x-auth-request-session-expire"),
            Some("2030-03-17T17:46:40Z")
        );
        for (_, value) in headers {
            http::HeaderValue::from_str(&value).expect("a valid header value");
        }
    }
}
