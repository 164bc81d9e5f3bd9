//! Stand-ins for the identity providers: real HTTP servers on free loopback ports that
//! answer as Appwrite's REST API and an RFC 7662 introspection endpoint do, from a
//! table of tokens the test changes at run time, with failure modes and call counters.
//!
//! ```ignore
//! let appwrite = AppwriteStandIn::start().await;
//! appwrite.add_session("tok", &user, expire);
//! // ... --idp appwrite --appwrite-endpoint <appwrite.endpoint()> --appwrite-project <appwrite.project()>
//! appwrite.revoke("tok");              // now answered 401, as Appwrite does
//! appwrite.set_mode(Mode::Status(500)); // every call fails
//! assert_eq!(appwrite.calls().account, 1);
//! ```
//!
//! What they follow: Appwrite's models and error body (`{"message","code","type",
//! "version"}`, types from appwrite/appwrite `app/config/errors.php`; a session secret
//! that is unknown, revoked or expired makes the caller a guest, answered 401
//! `general_unauthorized_scope`), and RFC 7662 §2 (Basic client credentials, a form
//! body with `token`, `{"active": false}` for any token that is not good, 401
//! `invalid_client` for bad credentials).
//!
//! Appwrite's JWTs as `app/init/resources/request.php` and `POST /v1/account/jwts`
//! make and check them: HS256 (adhocore/jwt) over `{"userId","sessionId","exp"}` with
//! a key of the stand-in's own, in `X-Appwrite-JWT`; a bad signature or a past `exp`
//! answers 401 `user_jwt_invalid`, a JWT whose session ended leaves the caller a guest,
//! a JWT beside a session 403 `user_jwt_and_cookie_set`. `GET
//! /v1/account/sessions/current` resolves `current` from a session secret, so with a
//! JWT it answers 404 `user_session_not_found`; `GET /v1/account/sessions/<id>`
//! answers the caller's session by ID.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL},
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use session_cache::entry::User;
use sha2::Sha256;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{free_port, pki};

/// How a stand-in answers every request, whatever its table says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// As the real API would, from the table.
    Normal,
    /// Refuse every token as the API does: Appwrite 401 `general_unauthorized_scope`,
    /// introspection `{"active": false}`.
    Refuse,
    /// This status, with the API's usual error body for it.
    Status(u16),
    /// This status with this error type (Appwrite `type`, OAuth `error`).
    Error(u16, &'static str),
    /// Answer normally after this long.
    Slow(Duration),
    /// Answer as the table stood when the request arrived, but only after this long:
    /// a reply still on its way while the session is revoked.
    Late(Duration),
    /// Take the request and never answer (the connection stays open).
    Hang,
    /// Close the connection without answering.
    Reset,
    /// HTTP 200 with a body that is not JSON (a proxy's error page, say).
    Garbage,
    /// HTTP 307 to another host.
    Redirect,
    /// A careless server: this status with an error message that quotes the token.
    EchoToken(u16),
}

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// A URL on a port where nothing listens (bound a moment ago, then closed): connecting
/// is refused.
pub fn not_listening_url(path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", free_port())
}

type Answer = Option<Response<Full<Bytes>>>;
type Handler = Arc<dyn Fn(Recorded) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// What both stand-ins share: the server task, the mode, the request log, and how many
/// requests are in flight.
struct Core {
    addr: SocketAddr,
    task: JoinHandle<()>,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Core {
    /// Serves HTTP/1.1 on a free port; `answer` gives each request's response (`None`
    /// closes the connection). Requests are logged and counted before the mode applies.
    async fn start<F, Fut>(answer: F, tls: Option<pki::Leaf>) -> Core
    where
        F: Fn(Recorded, Mode) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Answer> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let tls = tls.map(|leaf| acceptor(&leaf));
        let mode = Arc::new(Mutex::new(Mode::Normal));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let handler: Handler = {
            let (mode, requests, in_flight, peak) = (
                mode.clone(),
                requests.clone(),
                in_flight.clone(),
                peak.clone(),
            );
            let answer = Arc::new(answer);
            Arc::new(move |recorded: Recorded| {
                let (mode, in_flight, peak, answer) = (
                    mode.clone(),
                    in_flight.clone(),
                    peak.clone(),
                    answer.clone(),
                );
                requests.lock().unwrap().push(recorded.clone());
                Box::pin(async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let _done = Decrement(in_flight);
                    let mode = mode.lock().unwrap().clone();
                    match mode {
                        Mode::Hang => std::future::pending().await,
                        Mode::Reset => None,
                        Mode::Slow(pause) => {
                            tokio::time::sleep(pause).await;
                            answer(recorded, Mode::Normal).await
                        }
                        Mode::Late(pause) => {
                            let reply = answer(recorded, Mode::Normal).await;
                            tokio::time::sleep(pause).await;
                            reply
                        }
                        mode => answer(recorded, mode).await,
                    }
                })
            })
        };
        let task = tokio::spawn(async move {
            // Dropped with the task: every connection ends with the stand-in.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let (handler, tls) = (handler.clone(), tls.clone());
                connections.spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let recorded = Recorded {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body,
                            };
                            handler(recorded)
                                .await
                                .ok_or_else(|| std::io::Error::other("reset by the stand-in"))
                        }
                    });
                    match tls {
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Core {
            addr,
            task,
            mode,
            requests,
            in_flight,
            peak,
        }
    }
}

/// A TLS acceptor serving `leaf`, on ring.
fn acceptor(leaf: &pki::Leaf) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl Drop for Core {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    Some(response)
}

fn respond_json(status: u16, body: &Value) -> Answer {
    respond(status, "application/json", body.to_string())
}

fn garbage() -> Answer {
    respond(
        200,
        "text/html",
        "<html><body>502 Bad Gateway</body></html>",
    )
}

fn redirect() -> Answer {
    let mut response = respond(307, "text/plain", "moved").unwrap();
    response.headers_mut().insert(
        "location",
        "https://elsewhere.invalid/moved".parse().unwrap(),
    );
    Some(response)
}

/// Appwrite writes instants with milliseconds and an offset.
pub fn appwrite_instant(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string()
}

// ---------------------------------------------------------------------------------
// Appwrite
// ---------------------------------------------------------------------------------

/// The project the Appwrite stand-in serves unless told otherwise.
pub const APPWRITE_PROJECT: &str = "session-cache-test";

/// How many calls each Appwrite endpoint received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppwriteCalls {
    /// `GET /v1/account`
    pub account: usize,
    /// `GET /v1/account/sessions/current`
    pub session: usize,
}

struct AppwriteSession {
    session_id: String,
    user: User,
    prefs: Value,
    expire: DateTime<Utc>,
}

#[derive(Default)]
struct AppwriteTable {
    sessions: HashMap<String, AppwriteSession>,
    /// Sessions created so far, for their IDs.
    created: usize,
    /// The stand-in judges expiry by its clock minus this (a server clock behind ours).
    clock_behind: Duration,
}

/// A stand-in for Appwrite's REST API: `GET /v1/account` and
/// `GET /v1/account/sessions/current` for the session secret in `X-Appwrite-Session`.
pub struct AppwriteStandIn {
    core: Core,
    table: Arc<Mutex<AppwriteTable>>,
    project: String,
    scheme: &'static str,
}

impl AppwriteStandIn {
    /// Starts a stand-in serving [`APPWRITE_PROJECT`].
    pub async fn start() -> AppwriteStandIn {
        AppwriteStandIn::start_on(None).await
    }

    /// Starts a stand-in that speaks HTTPS with `leaf` (see [`pki::Ca::server`]).
    pub async fn start_tls(leaf: pki::Leaf) -> AppwriteStandIn {
        AppwriteStandIn::start_on(Some(leaf)).await
    }

    async fn start_on(tls: Option<pki::Leaf>) -> AppwriteStandIn {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let table = Arc::new(Mutex::new(AppwriteTable::default()));
        let project = APPWRITE_PROJECT.to_owned();
        let core = {
            let (table, project) = (table.clone(), project.clone());
            Core::start(
                move |request, mode| {
                    let answer = appwrite_answer(&table, &project, &request, mode);
                    async move { answer }
                },
                tls,
            )
            .await
        };
        AppwriteStandIn {
            core,
            table,
            project,
            scheme,
        }
    }

    /// The endpoint to configure (`--appwrite-endpoint`), with its `/v1`.
    pub fn endpoint(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.core.addr)
    }

    /// The project it serves (`--appwrite-project`).
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The service's flags for this stand-in.
    pub fn flags(&self) -> Vec<String> {
        [
            "--idp",
            "appwrite",
            "--appwrite-endpoint",
            &self.endpoint(),
            "--appwrite-project",
            &self.project,
        ]
        .map(String::from)
        .to_vec()
    }

    /// A session secret for `user` until `expire`, with prefs `{"tier": user.tier}`.
    /// Instants travel with milliseconds, as Appwrite writes them.
    pub fn add_session(&self, token: &str, user: &User, expire: DateTime<Utc>) {
        self.add_session_with_prefs(token, user, json!({ "tier": user.tier }), expire);
    }

    /// A session secret whose user has these prefs (an object).
    pub fn add_session_with_prefs(
        &self,
        token: &str,
        user: &User,
        prefs: Value,
        expire: DateTime<Utc>,
    ) {
        let mut table = self.table.lock().unwrap();
        table.created += 1;
        let session_id = format!("session{}", table.created);
        table.sessions.insert(
            token.to_owned(),
            AppwriteSession {
                session_id,
                user: user.clone(),
                prefs,
                expire,
            },
        );
    }

    /// Deletes the session (a sign-out): the secret is now a guest's, answered 401.
    pub fn revoke(&self, token: &str) {
        self.table.lock().unwrap().sessions.remove(token);
    }

    /// Deletes every session of the user (a password change, a block, a deletion).
    pub fn revoke_user(&self, user_id: &str) {
        self.table
            .lock()
            .unwrap()
            .sessions
            .retain(|_, session| session.user.id != user_id);
    }

    /// The ID of the session whose secret is `token`, and its user's ID.
    pub fn session_of(&self, token: &str) -> Option<(String, String)> {
        let table = self.table.lock().unwrap();
        let session = table.sessions.get(token)?;
        Some((session.session_id.clone(), session.user.id.clone()))
    }

    /// A JWT for the session whose secret is `token`, valid for `duration`, as
    /// `account.createJWT` makes it (adhocore/jwt: `{"typ":"JWT","alg":"HS256"}`, then
    /// `{"userId","sessionId","exp"}`, base64url without padding).
    pub fn create_jwt(&self, token: &str, duration: Duration) -> String {
        let (session_id, user_id) = self.session_of(token).expect("a session of the stand-in");
        let exp = Utc::now().timestamp() + duration.as_secs() as i64;
        self.sign_jwt(&json!({ "userId": user_id, "sessionId": session_id, "exp": exp }))
    }

    /// A JWT with these claims, signed with the stand-in's key.
    pub fn sign_jwt(&self, claims: &Value) -> String {
        let header = BASE64URL.encode(r#"{"typ":"JWT","alg":"HS256"}"#);
        let payload = BASE64URL.encode(claims.to_string());
        let mut mac = Hmac::<Sha256>::new_from_slice(APPWRITE_JWT_KEY).unwrap();
        mac.update(format!("{header}.{payload}").as_bytes());
        let signature = BASE64URL.encode(mac.finalize().into_bytes());
        format!("{header}.{payload}.{signature}")
    }

    /// Judges expiry as a server whose clock is `behind` ours would (so that it
    /// answers 200 for a session that has just expired by our clock).
    pub fn set_clock_behind(&self, behind: Duration) {
        self.table.lock().unwrap().clock_behind = behind;
    }

    /// How every request is answered from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.core.mode.lock().unwrap() = mode;
    }

    /// Requests received, per endpoint.
    pub fn calls(&self) -> AppwriteCalls {
        let requests = self.core.requests.lock().unwrap();
        AppwriteCalls {
            account: requests.iter().filter(|r| r.path == "/v1/account").count(),
            session: requests
                .iter()
                .filter(|r| r.path == "/v1/account/sessions/current")
                .count(),
        }
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.core.requests.lock().unwrap().clone()
    }

    /// The most requests that were being answered at once.
    pub fn peak_in_flight(&self) -> usize {
        self.core.peak.load(Ordering::SeqCst)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.core.in_flight.load(Ordering::SeqCst)
    }
}

fn appwrite_error(status: u16, kind: &str, message: &str) -> Answer {
    respond_json(
        status,
        &json!({ "message": message, "code": status, "type": kind, "version": "1.8.0" }),
    )
}

/// Appwrite's usual error type for a status.
fn appwrite_type(status: u16) -> (&'static str, &'static str) {
    match status {
        401 => (
            "general_unauthorized_scope",
            "User (role: guests) missing scopes ([\"account\"])",
        ),
        403 => (
            "general_unknown_origin",
            "The request originated from an unknown origin.",
        ),
        404 => (
            "project_not_found",
            "Project with the requested ID could not be found.",
        ),
        429 => (
            "general_rate_limit_exceeded",
            "Rate limit for the current endpoint has been exceeded.",
        ),
        503 => (
            "general_service_disabled",
            "The requested service is disabled.",
        ),
        s if s >= 500 => ("general_server_error", "Server Error"),
        _ => ("general_unknown", "Unknown error"),
    }
}

/// The key the stand-in signs its JWTs with (`_APP_OPENSSL_KEY_V1` in Appwrite).
const APPWRITE_JWT_KEY: &[u8] = b"stand-in-openssl-key-v1";

/// The `(userId, sessionId)` of a JWT the stand-in signed that has not expired; `None`
/// for anything else (Appwrite's `user_jwt_invalid`).
fn verify_jwt(jwt: &str) -> Option<(String, String)> {
    let (message, signature) = jwt.rsplit_once('.')?;
    let (_, payload) = message.split_once('.')?;
    let mut mac = Hmac::<Sha256>::new_from_slice(APPWRITE_JWT_KEY).unwrap();
    mac.update(message.as_bytes());
    mac.verify_slice(&BASE64URL.decode(signature).ok()?).ok()?;
    let claims: Value = serde_json::from_slice(&BASE64URL.decode(payload).ok()?).ok()?;
    if claims["exp"]
        .as_i64()
        .is_some_and(|exp| exp < Utc::now().timestamp())
    {
        return None;
    }
    Some((
        claims["userId"].as_str()?.to_owned(),
        claims["sessionId"].as_str().unwrap_or_default().to_owned(),
    ))
}

fn appwrite_answer(
    table: &Mutex<AppwriteTable>,
    project: &str,
    request: &Recorded,
    mode: Mode,
) -> Answer {
    let secret = request.header("x-appwrite-session");
    let jwt = request.header("x-appwrite-jwt");
    match mode {
        Mode::Normal => {}
        Mode::Refuse => {
            let (kind, message) = appwrite_type(401);
            return appwrite_error(401, kind, message);
        }
        Mode::Status(status) => {
            let (kind, message) = appwrite_type(status);
            return appwrite_error(status, kind, message);
        }
        Mode::Error(status, kind) => return appwrite_error(status, kind, "as the test asked"),
        Mode::Garbage => return garbage(),
        Mode::Redirect => return redirect(),
        Mode::EchoToken(status) => {
            return appwrite_error(
                status,
                "general_argument_invalid",
                &format!("Invalid session {secret} for this project"),
            );
        }
        Mode::Slow(_) | Mode::Late(_) | Mode::Hang | Mode::Reset => {
            unreachable!("handled by the core")
        }
    }
    let route = match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/v1/account") => Route::Account,
        ("GET", "/v1/account/sessions/current") => Route::Session,
        ("GET", path) if path.starts_with("/v1/account/sessions/") => {
            Route::SessionById(path["/v1/account/sessions/".len()..].to_owned())
        }
        _ => {
            return appwrite_error(404, "general_route_not_found", "Route not found.");
        }
    };
    if request.header("x-appwrite-project") != project {
        let (kind, message) = appwrite_type(404);
        return appwrite_error(404, kind, message);
    }
    let table = table.lock().unwrap();
    let judged_now = Utc::now() - table.clock_behind;
    let live = |s: &&AppwriteSession| s.expire >= judged_now;
    let by_secret = table.sessions.get(&secret).filter(live);
    let session = if jwt.is_empty() {
        by_secret
    } else {
        if by_secret.is_some() {
            return appwrite_error(
                403,
                "user_jwt_and_cookie_set",
                "JWT and cookie used in the same request.",
            );
        }
        let Some((user_id, session_id)) = verify_jwt(&jwt) else {
            return appwrite_error(401, "user_jwt_invalid", "Failed to verify JWT.");
        };
        // The JWT's user while its session is active, else a guest.
        table
            .sessions
            .values()
            .filter(live)
            .find(|s| s.user.id == user_id && s.session_id == session_id)
    };
    let Some(session) = session else {
        let (kind, message) = appwrite_type(401);
        return appwrite_error(401, kind, message);
    };
    let not_found = || {
        appwrite_error(
            404,
            "user_session_not_found",
            "The current user session could not be found.",
        )
    };
    let (route, session) = match route {
        // `current` is the session of the secret; a JWT request has none.
        Route::Session if !jwt.is_empty() => return not_found(),
        // Any session of the caller, by its ID.
        Route::SessionById(id) => match table
            .sessions
            .values()
            .find(|s| s.user.id == session.user.id && s.session_id == id)
        {
            Some(by_id) => (Route::Session, by_id),
            None => return not_found(),
        },
        route => (route, session),
    };
    let user = &session.user;
    let body = match route {
        Route::Account => json!({
            "$id": user.id,
            "$createdAt": appwrite_instant(user.created_at),
            "$updatedAt": appwrite_instant(user.updated_at),
            "name": user.name,
            "registration": appwrite_instant(user.created_at),
            "status": true,
            "labels": [],
            "passwordUpdate": appwrite_instant(user.created_at),
            "email": user.email,
            "phone": "",
            "emailVerification": user.email_verified,
            "phoneVerification": false,
            "mfa": false,
            "prefs": session.prefs,
            "targets": [],
            "accessedAt": appwrite_instant(Utc::now()),
        }),
        Route::Session => json!({
            "$id": session.session_id,
            "$createdAt": appwrite_instant(user.updated_at),
            "$updatedAt": appwrite_instant(user.updated_at),
            "userId": user.id,
            "expire": appwrite_instant(session.expire),
            "provider": "email",
            "providerUid": user.email,
            "providerAccessToken": "",
            "providerAccessTokenExpiry": "",
            "providerRefreshToken": "",
            "ip": "127.0.0.1",
            "osCode": "LIN",
            "osName": "Linux",
            "osVersion": "",
            "clientType": "library",
            "clientCode": "",
            "clientName": "",
            "clientVersion": "",
            "clientEngine": "",
            "clientEngineVersion": "",
            "deviceName": "desktop",
            "deviceBrand": "",
            "deviceModel": "",
            "countryCode": "--",
            "countryName": "Unknown",
            "current": true,
            "factors": ["password"],
            "secret": "",
            "mfaUpdatedAt": "",
        }),
        Route::SessionById(_) => unreachable!("answered as Session"),
    };
    respond_json(200, &body)
}

enum Route {
    Account,
    Session,
    SessionById(String),
}

// ---------------------------------------------------------------------------------
// RFC 7662 introspection
// ---------------------------------------------------------------------------------

/// The client ID the introspection stand-in accepts unless told otherwise.
pub const CLIENT_ID: &str = "session-cache";
/// Its client secret: characters that RFC 6749 §2.3.1's form-encoding changes.
pub const CLIENT_SECRET: &str = "s3cret: with+plus/slash&amp é";

#[derive(Default)]
struct IntrospectionTable {
    /// Token → claims (without `active`).
    tokens: HashMap<String, Value>,
    /// The stand-in judges `exp` by its clock minus this.
    clock_behind: Duration,
}

/// A stand-in for an RFC 7662 introspection endpoint at `POST /oauth2/introspect`.
pub struct IntrospectionStandIn {
    core: Core,
    table: Arc<Mutex<IntrospectionTable>>,
    client_id: String,
    client_secret: String,
    /// Where [`IntrospectionStandIn::flags`] writes the secret; removed on drop.
    files: pki::Dir,
}

impl IntrospectionStandIn {
    /// Starts a stand-in accepting [`CLIENT_ID`] and [`CLIENT_SECRET`].
    pub async fn start() -> IntrospectionStandIn {
        IntrospectionStandIn::start_with(CLIENT_ID, CLIENT_SECRET).await
    }

    /// Starts a stand-in accepting these client credentials.
    pub async fn start_with(client_id: &str, client_secret: &str) -> IntrospectionStandIn {
        let table = Arc::new(Mutex::new(IntrospectionTable::default()));
        let credentials = (client_id.to_owned(), client_secret.to_owned());
        let core = {
            let table = table.clone();
            Core::start(
                move |request, mode| {
                    let answer = introspection_answer(&table, &credentials, &request, mode);
                    async move { answer }
                },
                None,
            )
            .await
        };
        IntrospectionStandIn {
            core,
            table,
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            files: pki::Dir::new(),
        }
    }

    /// The endpoint to configure (`--introspection-url`).
    pub fn url(&self) -> String {
        format!("http://{}/oauth2/introspect", self.core.addr)
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn client_secret(&self) -> &str {
        &self.client_secret
    }

    /// The service's flags for this stand-in; the secret goes in a file that lives as
    /// long as the stand-in.
    pub fn flags(&self) -> Vec<String> {
        let secret = self
            .files
            .write("client-secret", format!("{}\n", self.client_secret));
        [
            "--idp",
            "introspection",
            "--introspection-url",
            &self.url(),
            "--introspection-client-id",
            &self.client_id,
            "--introspection-client-secret-file",
            &secret,
        ]
        .map(String::from)
        .to_vec()
    }

    /// An active token for `user` until `expire`, with the claims an OpenID provider
    /// gives: sub, email, name, email_verified, tier, iat (created_at), updated_at, exp.
    /// NumericDates are whole seconds.
    pub fn add_session(&self, token: &str, user: &User, expire: DateTime<Utc>) {
        self.add_claims(
            token,
            json!({
                "sub": user.id,
                "email": user.email,
                "name": user.name,
                "email_verified": user.email_verified,
                "tier": user.tier,
                "iat": user.created_at.timestamp(),
                "updated_at": user.updated_at.timestamp(),
                "exp": expire.timestamp(),
                "client_id": "some-app",
                "token_type": "Bearer",
                "scope": "openid email profile",
            }),
        );
    }

    /// An active token with exactly these claims (an object; `active` is added).
    pub fn add_claims(&self, token: &str, claims: Value) {
        self.table
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), claims);
    }

    /// Revokes the token: it is answered `{"active": false}` from now on.
    pub fn revoke(&self, token: &str) {
        self.table.lock().unwrap().tokens.remove(token);
    }

    /// Judges `exp` as a server whose clock is `behind` ours would (so that it calls
    /// a token active that has just expired by our clock).
    pub fn set_clock_behind(&self, behind: Duration) {
        self.table.lock().unwrap().clock_behind = behind;
    }

    /// How every request is answered from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.core.mode.lock().unwrap() = mode;
    }

    /// Requests received.
    pub fn calls(&self) -> usize {
        self.core.requests.lock().unwrap().len()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.core.requests.lock().unwrap().clone()
    }

    /// The most requests that were being answered at once.
    pub fn peak_in_flight(&self) -> usize {
        self.core.peak.load(Ordering::SeqCst)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.core.in_flight.load(Ordering::SeqCst)
    }
}

/// The client credentials of an `Authorization: Basic` header, each form-urldecoded
/// (RFC 6749 §2.3.1).
pub fn basic_credentials(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(BASE64.decode(encoded).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((unescape(id)?, unescape(secret)?))
}

fn oauth_error(status: u16, error: &str) -> Answer {
    let mut response = respond_json(status, &json!({ "error": error }))?;
    if status == 401 {
        response.headers_mut().insert(
            "www-authenticate",
            "Basic realm=\"introspection\"".parse().unwrap(),
        );
    }
    Some(response)
}

fn introspection_answer(
    table: &Mutex<IntrospectionTable>,
    (client_id, client_secret): &(String, String),
    request: &Recorded,
    mode: Mode,
) -> Answer {
    let form: HashMap<String, String> =
        form_urlencoded::parse(&request.body).into_owned().collect();
    match mode {
        Mode::Normal => {}
        Mode::Refuse => return respond_json(200, &json!({ "active": false })),
        Mode::Status(status) => {
            let error = match status {
                401 => "invalid_client",
                400 => "invalid_request",
                429 => "slow_down",
                s if s >= 500 => "server_error",
                _ => "unknown",
            };
            return oauth_error(status, error);
        }
        Mode::Error(status, error) => return oauth_error(status, error),
        Mode::Garbage => return garbage(),
        Mode::Redirect => return redirect(),
        Mode::EchoToken(status) => {
            let token = form.get("token").cloned().unwrap_or_default();
            return respond_json(
                status,
                &json!({ "error": "invalid_request",
                         "error_description": format!("cannot introspect {token}") }),
            );
        }
        Mode::Slow(_) | Mode::Late(_) | Mode::Hang | Mode::Reset => {
            unreachable!("handled by the core")
        }
    }
    if request.method != "POST" || request.path != "/oauth2/introspect" {
        return respond(404, "text/plain", "not found");
    }
    let credentials = basic_credentials(&request.header("authorization"));
    if credentials.as_ref() != Some(&(client_id.clone(), client_secret.clone())) {
        return oauth_error(401, "invalid_client");
    }
    if !request
        .header("content-type")
        .starts_with("application/x-www-form-urlencoded")
    {
        return oauth_error(400, "invalid_request");
    }
    let Some(token) = form.get("token") else {
        return oauth_error(400, "invalid_request");
    };
    let table = table.lock().unwrap();
    let now = (Utc::now() - table.clock_behind).timestamp();
    let active = table.tokens.get(token).filter(|claims| {
        claims
            .get("exp")
            .and_then(Value::as_i64)
            .is_none_or(|exp| exp > now)
    });
    match active {
        Some(Value::Object(claims)) => {
            // A test may plant its own (malformed) `active`.
            let mut body = claims.clone();
            body.entry("active").or_insert(Value::Bool(true));
            respond_json(200, &Value::Object(body))
        }
        _ => respond_json(200, &json!({ "active": false })),
    }
}
