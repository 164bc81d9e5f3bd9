//! A stand-in OpenID provider for back-channel logout: a real HTTP server on a free
//! loopback port serving its JSON Web Key Set (RFC 7517) at `/jwks`, with keys of its own
//! (RSA and EC P-256, made by `openssl genpkey` at start), logout tokens signed as
//! OpenID Connect Back-Channel Logout 1.0 §2.4 describes them, key rotation, failure
//! modes, and a count of key-set requests.
//!
//! ```ignore
//! let idp = OidcStandIn::start().await;
//! // ... --oidc-issuer/--oidc-audience/--oidc-jwks-url from idp.flags()
//! let token = idp.logout_token(Some("user-1"), Some("sid-1"));
//! let reply = oidc::post_logout(addr, &token).await;
//! idp.rotate();                     // a new RSA key; the old one leaves the set
//! idp.set_mode(Mode::Status(503));  // the key set cannot be had
//! ```

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use ::http::{Request, Response};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    http::{self, Reply},
    idp::Mode,
};

/// The client the stand-in issues logout tokens for (`--oidc-audience`).
pub const AUDIENCE: &str = "session-cache";
/// The `events` member of a logout token.
pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// A signing key: its ID, algorithm, private half and public JWK.
#[derive(Clone)]
pub struct Key {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    pub public: Jwk,
}

impl Key {
    /// A new key made by `openssl genpkey` (`RSA` 2048 bits, or EC on P-256/P-384).
    pub fn generate(kid: &str, alg: Algorithm) -> Key {
        let args: &[&str] = match alg {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
            }
            Algorithm::ES256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Algorithm::ES384 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            other => panic!("no key generation for {other:?}"),
        };
        let out = Command::new("openssl")
            .arg("genpkey")
            .args(args)
            .output()
            .expect("openssl must be installed (Debian package openssl)");
        assert!(out.status.success(), "openssl genpkey failed");
        let encoding = match alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&out.stdout),
            _ => EncodingKey::from_rsa_pem(&out.stdout),
        }
        .unwrap();
        let mut public = Jwk::from_encoding_key(&encoding, alg).unwrap();
        public.common.key_id = Some(kid.to_owned());
        Key {
            kid: kid.to_owned(),
            alg,
            encoding,
            public,
        }
    }

    /// A JWT of `claims` signed with this key, with `kid` in the header (this key's
    /// unless told otherwise; `None` for no `kid`).
    pub fn sign(&self, claims: &Value, kid: Option<Option<&str>>) -> String {
        let mut header = Header::new(self.alg);
        header.typ = Some("logout+jwt".into());
        header.kid = match kid {
            None => Some(self.kid.clone()),
            Some(kid) => kid.map(str::to_owned),
        };
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

struct State {
    /// Keys that sign, by ID.
    keys: Vec<Key>,
    /// The keys the set publishes.
    published: Vec<Jwk>,
    mode: Mode,
    rotations: usize,
}

/// A stand-in OpenID provider.
pub struct OidcStandIn {
    addr: SocketAddr,
    task: JoinHandle<()>,
    state: Arc<Mutex<State>>,
    requests: Arc<AtomicUsize>,
    next_jti: AtomicUsize,
}

impl OidcStandIn {
    /// Starts a provider whose set holds an RSA key `rsa-1` (RS256) and an EC key
    /// `ec-1` (ES256).
    pub async fn start() -> OidcStandIn {
        let keys = vec![
            Key::generate("rsa-1", Algorithm::RS256),
            Key::generate("ec-1", Algorithm::ES256),
        ];
        let published = keys.iter().map(|k| k.public.clone()).collect();
        let state = Arc::new(Mutex::new(State {
            keys,
            published,
            mode: Mode::Normal,
            rotations: 1,
        }));
        let requests = Arc::new(AtomicUsize::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = {
            let (state, requests) = (state.clone(), requests.clone());
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    while connections.try_join_next().is_some() {}
                    let (state, requests) = (state.clone(), requests.clone());
                    connections.spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let (state, requests) = (state.clone(), requests.clone());
                            async move { answer(&state, &requests, request).await }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        OidcStandIn {
            addr,
            task,
            state,
            requests,
            next_jti: AtomicUsize::new(0),
        }
    }

    /// The issuer, as its tokens carry it.
    pub fn issuer(&self) -> String {
        format!("http://{}/realms/test", self.addr)
    }

    /// The key set's URL.
    pub fn jwks_url(&self) -> String {
        format!(
            "http://{}/realms/test/protocol/openid-connect/certs",
            self.addr
        )
    }

    /// The service's flags for this provider.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--oidc-issuer".into(),
            self.issuer(),
            "--oidc-audience".into(),
            AUDIENCE.into(),
            "--oidc-jwks-url".into(),
            self.jwks_url(),
        ]
    }

    /// How the key set is answered from now on (Normal, Status, Slow, Hang, Garbage).
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Requests for the key set so far.
    pub fn jwks_requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The signing key with this ID.
    pub fn key(&self, kid: &str) -> Key {
        let state = self.state.lock().unwrap();
        state
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
            .expect("a key of the stand-in")
    }

    /// The RSA key that signs now.
    pub fn current(&self) -> Key {
        let state = self.state.lock().unwrap();
        state
            .keys
            .iter()
            .find(|k| k.kid.starts_with("rsa-"))
            .cloned()
            .unwrap()
    }

    /// Adds a key (signing and published).
    pub fn add_key(&self, key: Key) {
        let mut state = self.state.lock().unwrap();
        state.published.push(key.public.clone());
        state.keys.insert(0, key);
    }

    /// Publishes a key under an ID without signing with it.
    pub fn publish(&self, jwk: Jwk) {
        self.state.lock().unwrap().published.push(jwk);
    }

    /// Rotates the RSA key: a new one signs and is published, the old one leaves the
    /// set. Returns the new key's ID.
    pub fn rotate(&self) -> String {
        let mut state = self.state.lock().unwrap();
        state.rotations += 1;
        let key = Key::generate(&format!("rsa-{}", state.rotations), Algorithm::RS256);
        let kid = key.kid.clone();
        state.keys.retain(|k| !k.kid.starts_with("rsa-"));
        state.published.retain(|jwk| {
            !jwk.common
                .key_id
                .as_deref()
                .is_some_and(|id| id.starts_with("rsa-"))
        });
        state.published.push(key.public.clone());
        state.keys.insert(0, key);
        kid
    }

    /// The claims of a valid logout token for `sub` and/or `sid`, with a fresh `jti`.
    pub fn claims(&self, sub: Option<&str>, sid: Option<&str>) -> Value {
        let now = chrono::Utc::now().timestamp();
        let jti = self.next_jti.fetch_add(1, Ordering::SeqCst);
        let mut claims = json!({
            "iss": self.issuer(),
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 120,
            "jti": format!("jti-{}-{jti}", self.addr.port()),
            "events": { BACKCHANNEL_EVENT: {} },
        });
        if let Some(sub) = sub {
            claims["sub"] = json!(sub);
        }
        if let Some(sid) = sid {
            claims["sid"] = json!(sid);
        }
        claims
    }

    /// A valid logout token for `sub` and/or `sid`, signed with the current RSA key.
    pub fn logout_token(&self, sub: Option<&str>, sid: Option<&str>) -> String {
        self.current().sign(&self.claims(sub, sid), None)
    }
}

impl Drop for OidcStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    state: &Mutex<State>,
    requests: &AtomicUsize,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    requests.fetch_add(1, Ordering::SeqCst);
    let (mode, set) = {
        let state = state.lock().unwrap();
        (state.mode.clone(), json!({ "keys": state.published }))
    };
    let respond = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(std::io::Error::other)
    };
    if !request.uri().path().ends_with("/certs") {
        return respond(404, "{}".into());
    }
    match mode {
        Mode::Normal => respond(200, set.to_string()),
        Mode::Status(status) => respond(status, r#"{"error":"unavailable"}"#.into()),
        Mode::Slow(pause) => {
            tokio::time::sleep(pause).await;
            respond(200, set.to_string())
        }
        Mode::Hang => std::future::pending().await,
        Mode::Garbage => respond(200, "<html>502 Bad Gateway</html>".into()),
        Mode::Reset => Err(std::io::Error::other("reset by the stand-in")),
        other => panic!("{other:?} means nothing to the OpenID stand-in"),
    }
}

/// Posts a logout token to the service's back-channel logout endpoint, as a provider
/// does (a form with `logout_token`).
pub async fn post_logout(addr: SocketAddr, token: &str) -> Reply {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("logout_token", token)
        .finish();
    http::post(
        addr,
        "/backchannel-logout",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await
}

/// A token with this header and claims and a signature of garbage: for refusals that
/// come before any key is looked at (`alg: none`, HMAC).
pub fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        BASE64URL.encode(header.to_string()),
        BASE64URL.encode(claims.to_string()),
        if header["alg"] == "none" {
            ""
        } else {
            "c2lnbmF0dXJl"
        }
    )
}
