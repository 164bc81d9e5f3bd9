//! The keys file of `--api-keys-file`: TOML that maps API keys (by their SHA-256) and
//! client certificates (by a DNS name) to roles. Read and checked before anything binds,
//! and again on each reload; a file with a mistake is refused whole, naming the entry and
//! the field, never quoting a line (which may hold a secret).

use std::{collections::HashSet, path::Path};

use rustls_pki_types::ServerName;
use serde::Deserialize;

use super::{Authenticator, Key, Subject};
use crate::{error::SetupError, files::read, rpc::Role};

const FLAG: &str = "--api-keys-file";

/// Reads and checks the keys file at `path`; `client_ca` tells whether client
/// certificates are verified (`--tls-client-ca`), as a file that maps them needs.
pub fn load(path: &Path, client_ca: bool) -> Result<Authenticator, SetupError> {
    let text = String::from_utf8(read(path, FLAG)?)
        .map_err(|_| SetupError::file(FLAG, path, "not UTF-8 text"))?;
    let auth = Authenticator::from_toml(&text).map_err(|e| SetupError::file(FLAG, path, e))?;
    if auth.has_certificates() && !client_ca {
        return Err(SetupError::file(
            FLAG,
            path,
            "maps [[certificates]] but no --tls-client-ca verifies them",
        ));
    }
    Ok(auth)
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

impl Authenticator {
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
        let mut names = HashSet::new();
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
}

fn check_entry(
    at: &str,
    name: &str,
    roles: &[Role],
    names: &mut HashSet<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::sha;

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
