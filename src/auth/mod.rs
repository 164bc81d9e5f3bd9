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
//! `reader` may call Get, Validate, Health and Envoy's Check; `writer` may also call Set
//! and the invalidations (the table is `crate::rpc`). `grpc.health.v1` and reflection
//! need no credentials. The call layer (`crate::call`) asks [`Authenticator::authorize`]
//! about every call before its message is read.

mod keys_file;

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tracing::{info, warn};

pub use keys_file::load;

use crate::rpc::Role;

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

    /// Whether any caller must authenticate.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty() || !self.subjects.is_empty()
    }

    /// Whether client certificates map to callers.
    pub fn has_certificates(&self) -> bool {
        !self.subjects.is_empty()
    }

    /// Identifies the caller of a request from its headers and TLS peer, and checks
    /// that it holds `needed`.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
        needed: Role,
    ) -> Result<Option<Caller>, Denied> {
        if !self.is_enabled() {
            return Ok(None);
        }
        let caller = peer_certs
            .and_then(|certs| certs.first())
            .and_then(|leaf| self.by_certificate(leaf))
            .or_else(|| self.by_key(headers))
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

    fn by_key(&self, headers: &HeaderMap) -> Option<Caller> {
        let header = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
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

/// The callers' credentials in force, shared by the call layer and the reload watcher
/// and replaced whole when the keys file is reloaded: each call is judged by the set that
/// was in force when it arrived.
pub type Current = Arc<ArcSwap<Authenticator>>;

/// Credentials in force holding `auth`.
pub fn current(auth: Authenticator) -> Current {
    Arc::new(ArcSwap::from_pointee(auth))
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

    /// The keys file's form of a key: lowercase hex SHA-256.
    pub(super) fn sha(key: &str) -> String {
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

    fn bearer(key: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
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
        for metadata in [HeaderMap::new(), bearer("guess"), bearer("")] {
            assert_eq!(
                auth.authorize(&metadata, None, Role::Reader),
                Err(Denied::Unauthenticated)
            );
        }
        let mut basic = HeaderMap::new();
        basic.insert("authorization", "Basic cmVhZC1rZXk=".parse().unwrap());
        assert_eq!(
            auth.authorize(&basic, None, Role::Reader),
            Err(Denied::Unauthenticated)
        );
    }
}
