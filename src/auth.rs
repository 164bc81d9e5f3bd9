//! Who may call what: API keys (`authorization: Bearer <key>`) and client certificates,
//! each mapped to roles by one TOML file.
//!
//! ```toml
//! [[keys]]
//! name = "web-frontend"           # logged instead of the key
//! sha256 = "9f86d0…"              # lowercase hex SHA-256 of the key; never the key
//! roles = ["reader"]
//!
//! [[certificates]]                # with --tls-client-ca
//! name = "auth-gateway"
//! subject = "auth-gateway.internal"   # a DNS name in the certificate's subjectAltName
//! roles = ["writer"]
//! ```
//!
//! `reader` may call Get and Health; `writer` may also call Set and the invalidations.
//! `grpc.health.v1` and reflection are not behind this check.

use std::{
    convert::Infallible,
    fmt,
    path::Path,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service, http},
    metadata::MetadataMap,
    server::NamedService,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tracing::{info, warn};

use crate::rpc::Rpc;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Get, Validate and Health.
    Reader,
    /// Everything a reader may, plus Set, InvalidateToken and InvalidateUser.
    Writer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
        })
    }
}

/// An authenticated caller, by the name the keys file gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    role: Role,
}

/// Why a call was refused; the service turns it into a gRPC status.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credentials, or none that the keys file knows.
    #[error("missing or unknown credentials: send authorization: Bearer <api key>")]
    Unauthenticated,
    /// Known caller, insufficient role.
    #[error("caller {caller:?} lacks the {needed} role")]
    PermissionDenied { caller: String, needed: Role },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    keys: Vec<KeyEntry>,
    #[serde(default)]
    certificates: Vec<CertificateEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    roles: Vec<Role>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateEntry {
    name: String,
    subject: String,
    roles: Vec<Role>,
}

struct Key {
    name: String,
    sha256: [u8; 32],
    role: Role,
}

struct Subject {
    name: String,
    dns_name: ServerName<'static>,
    role: Role,
}

/// The callers the service knows; empty when no authentication is configured.
#[derive(Default)]
pub struct Authenticator {
    keys: Vec<Key>,
    subjects: Vec<Subject>,
}

impl Authenticator {
    /// Nobody is checked: every call is allowed (loopback-only by default, see config).
    pub fn open() -> Self {
        Authenticator::default()
    }

    /// Reads and checks a keys file; the error names the entry and what is wrong.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Authenticator::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the keys file's text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        // toml's Display quotes the offending line, which may hold a secret: report
        // the line number and the message only.
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1)
                .unwrap_or(0);
            format!("line {line}: {}", e.message())
        })?;
        let mut names = std::collections::HashSet::new();
        let mut auth = Authenticator::default();
        for (i, entry) in file.keys.into_iter().enumerate() {
            let at = format!("keys[{i}]");
            check_entry(&at, &entry.name, &entry.roles, &mut names)?;
            let sha256 = parse_sha256(&entry.sha256).ok_or_else(|| {
                format!("{at}.sha256: not 64 lowercase hex characters (the SHA-256 of the key)")
            })?;
            if auth.keys.iter().any(|k| k.sha256 == sha256) {
                return Err(format!("{at}.sha256: the same key is listed twice"));
            }
            auth.keys.push(Key {
                role: top_role(&entry.roles),
                name: entry.name,
                sha256,
            });
        }
        for (i, entry) in file.certificates.into_iter().enumerate() {
            let at = format!("certificates[{i}]");
            check_entry(&at, &entry.name, &entry.roles, &mut names)?;
            let dns_name = ServerName::try_from(entry.subject.clone())
                .ok()
                .filter(|n| matches!(n, ServerName::DnsName(_)))
                .ok_or_else(|| format!("{at}.subject: not a DNS name"))?;
            auth.subjects.push(Subject {
                role: top_role(&entry.roles),
                name: entry.name,
                dns_name,
            });
        }
        if auth.keys.is_empty() && auth.subjects.is_empty() {
            return Err("lists no [[keys]] and no [[certificates]]".into());
        }
        Ok(auth)
    }

    /// Whether any caller must authenticate.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty() || !self.subjects.is_empty()
    }

    /// Whether client certificates map to callers.
    pub fn has_certificates(&self) -> bool {
        !self.subjects.is_empty()
    }

    /// Identifies the caller of a request and checks that it holds `needed`.
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
        needed: Role,
    ) -> Result<Option<Caller>, Denied> {
        if !self.is_enabled() {
            return Ok(None);
        }
        let caller = peer_certs
            .and_then(|certs| certs.first())
            .and_then(|leaf| self.by_certificate(leaf))
            .or_else(|| self.by_key(metadata))
            .ok_or(Denied::Unauthenticated)?;
        if caller.role < needed {
            return Err(Denied::PermissionDenied {
                caller: caller.name,
                needed,
            });
        }
        Ok(Some(caller))
    }

    fn by_certificate(&self, leaf: &CertificateDer<'_>) -> Option<Caller> {
        // The TLS layer has verified the chain against --tls-client-ca; this only maps
        // the verified certificate's names to a caller.
        let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
        self.subjects
            .iter()
            .find(|s| cert.verify_is_valid_for_subject_name(&s.dns_name).is_ok())
            .map(|s| Caller {
                name: s.name.clone(),
                role: s.role,
            })
    }

    fn by_key(&self, metadata: &MetadataMap) -> Option<Caller> {
        let header = metadata.get("authorization")?.to_str().ok()?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))?
            .trim();
        if key.is_empty() {
            return None;
        }
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Compare with every key, without stopping at a match, in constant time each.
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.sha256.ct_eq(&presented)) {
                found = Some(k);
            }
        }
        found.map(|k| Caller {
            name: k.name.clone(),
            role: k.role,
        })
    }
}

fn check_entry(
    at: &str,
    name: &str,
    roles: &[Role],
    names: &mut std::collections::HashSet<String>,
) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{at}.name: must not be empty"));
    }
    if !names.insert(name.to_owned()) {
        return Err(format!("{at}.name: {name:?} is used twice"));
    }
    if roles.is_empty() {
        return Err(format!("{at}.roles: give \"reader\" or \"writer\""));
    }
    Ok(())
}

fn top_role(roles: &[Role]) -> Role {
    roles.iter().copied().max().unwrap_or(Role::Reader)
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A caller that [`Gate`] admitted, for the handlers' logs; `None` when the service
/// authenticates no one.
#[derive(Clone, Debug)]
pub struct Admitted(pub Option<String>);

/// Checks the caller of every call to a service before its message is read: from the
/// request's headers and the TLS peer only. A refused call costs its headers and no more:
/// its body is never buffered, decoded or even read.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    auth: Keys,
}

/// The callers' credentials in force, shared by the [`Gate`] and the service and
/// replaced whole when the keys file is reloaded: each call is judged by the set that
/// was in force when it arrived.
pub type Keys = Arc<ArcSwap<Authenticator>>;

/// Keys holding `auth`, for [`Gate::new`] and `SessionCacheService::with_auth`.
pub fn keys(auth: Authenticator) -> Keys {
    Arc::new(ArcSwap::from_pointee(auth))
}

impl<S> Gate<S> {
    pub fn new(inner: S, auth: Keys) -> Self {
        Gate { inner, auth }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let rpc = Rpc::from_method(method);
        // Any other method (which the service answers UNIMPLEMENTED) needs a reader.
        let needed = rpc.map_or(Role::Reader, Rpc::role);
        let rpc = rpc.map_or("other", Rpc::name);
        let auth = self.auth.load();
        let admitted = if auth.is_enabled() {
            let metadata = MetadataMap::from_headers(request.headers().clone());
            let certs = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            auth.authorize(&metadata, certs.as_deref().map(Vec::as_slice), needed)
        } else {
            Ok(None)
        };
        match admitted {
            Ok(caller) => {
                request
                    .extensions_mut()
                    .insert(Admitted(caller.map(|c| c.name)));
                Box::pin(self.inner.call(request))
            }
            Err(denied) => {
                let status = denied.status();
                crate::metrics::call(rpc, started, crate::metrics::code_label(&status));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

impl Denied {
    /// The gRPC status a refused call gets, logged once.
    pub fn status(&self) -> Status {
        match self {
            Denied::Unauthenticated => {
                info!("call refused: no known credentials");
                Status::unauthenticated(self.to_string())
            }
            Denied::PermissionDenied { .. } => {
                warn!(reason = %self, "call refused");
                Status::permission_denied(self.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn auth() -> Authenticator {
        Authenticator::from_toml(&format!(
            "[[keys]]\nname = \"reader-svc\"\nsha256 = \"{}\"\nroles = [\"reader\"]\n\
             [[keys]]\nname = \"writer-svc\"\nsha256 = \"{}\"\nroles = [\"writer\"]\n",
            sha("read-key"),
            sha("write-key")
        ))
        .unwrap()
    }

    fn bearer(key: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {key}").parse().unwrap());
        m
    }

    /// Keys map to their roles; a writer may read; a reader may not write.
    #[test]
    fn roles() {
        let auth = auth();
        let reader = auth
            .authorize(&bearer("read-key"), None, Role::Reader)
            .unwrap();
        assert_eq!(reader.unwrap().name, "reader-svc");
        assert!(
            auth.authorize(&bearer("write-key"), None, Role::Reader)
                .is_ok()
        );
        assert!(
            auth.authorize(&bearer("write-key"), None, Role::Writer)
                .is_ok()
        );
        assert_eq!(
            auth.authorize(&bearer("read-key"), None, Role::Writer),
            Err(Denied::PermissionDenied {
                caller: "reader-svc".into(),
                needed: Role::Writer
            })
        );
    }

    /// No key, an unknown key and a malformed header are all unauthenticated.
    #[test]
    fn unknown_callers() {
        let auth = auth();
        for metadata in [MetadataMap::new(), bearer("guess"), bearer("")] {
            assert_eq!(
                auth.authorize(&metadata, None, Role::Reader),
                Err(Denied::Unauthenticated)
            );
        }
        let mut basic = MetadataMap::new();
        basic.insert("authorization", "Basic cmVhZC1rZXk=".parse().unwrap());
        assert_eq!(
            auth.authorize(&basic, None, Role::Reader),
            Err(Denied::Unauthenticated)
        );
    }

    /// A keys file with mistakes is refused, naming the entry and the field.
    #[test]
    fn bad_files() {
        let cases = [
            ("", "lists no"),
            (
                "[[keys]]\nname = \"a\"\nsha256 = \"abc\"\nroles = [\"reader\"]",
                "keys[0].sha256",
            ),
            (
                &format!(
                    "[[keys]]\nname = \"\"\nsha256 = \"{}\"\nroles = [\"reader\"]",
                    sha("k")
                ),
                "keys[0].name",
            ),
            (
                &format!(
                    "[[keys]]\nname = \"a\"\nsha256 = \"{}\"\nroles = []",
                    sha("k")
                ),
                "keys[0].roles",
            ),
            (
                &format!(
                    "[[keys]]\nname = \"a\"\nsha256 = \"{}\"\nroles = [\"admin\"]",
                    sha("k")
                ),
                "admin",
            ),
            (
                &format!(
                    "[[keys]]\nname = \"a\"\nkey = \"plain\"\nsha256 = \"{}\"\nroles = [\"reader\"]",
                    sha("k")
                ),
                "key",
            ),
            (
                "[[certificates]]\nname = \"c\"\nsubject = \"not a name!\"\nroles = [\"writer\"]",
                "certificates[0].subject",
            ),
        ];
        for (text, want) in cases {
            let error = Authenticator::from_toml(text).err().expect(text);
            assert!(error.contains(want), "{text}: {error}");
        }
    }
}
