//! Token hashing and the Redis key names shared with the Python service.
//!
//! A token never leaves this module in clear: every key, log line and metric names a
//! token by the first 32 hex characters of its SHA-256, exactly as the Python service
//! does, so that both can read each other's entries during a migration.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Prefix of a cached session: `session_cache:<hash>` (the Python service's layout).
pub const ENTRY_PREFIX: &str = "session_cache:";
/// Prefix of a user's invalidation marker: `user_invalidated:<user_id>` (the Python
/// service's layout).
pub const MARKER_PREFIX: &str = "user_invalidated:";
/// Prefix of a logout tombstone (new in this service): `session_revoked:{session_cache:<hash>}`.
/// The braces make Redis Cluster hash the tombstone by its entry's key, so both live in
/// one slot and one script may touch both (SPEC §8).
pub const TOMBSTONE_PREFIX: &str = "session_revoked:";

/// Prefix of a token the identity provider refused (new in this service, for
/// Validate's negative cache): `session_refused:{session_cache:<hash>}`, in its entry's
/// Cluster slot like the tombstone.
pub const REFUSED_PREFIX: &str = "session_refused:";

/// Prefix of the user an identity provider's session id belongs to (new in this
/// service, for back-channel logout tokens that name only the session, SPEC §12):
/// `session_sid:<hash>`, the session id hashed as tokens are, never in clear.
pub const SESSION_ID_PREFIX: &str = "session_sid:";

/// How many hex characters of the hash a log line may show.
const LOG_CHARS: usize = 16;

/// The 32 lowercase hex characters that stand for a token everywhere outside the
/// request: the first half of its SHA-256.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a token's UTF-8 bytes with plain SHA-256, as the Python service does.
    pub fn of(token: &str) -> Self {
        TokenHash::from_digest(&Sha256::digest(token.as_bytes()))
    }

    fn from_digest(digest: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (i, byte) in digest.iter().take(16).enumerate() {
            hex[2 * i] = HEX[usize::from(byte >> 4)];
            hex[2 * i + 1] = HEX[usize::from(byte & 0x0f)];
        }
        TokenHash(hex)
    }

    /// The 32 hex characters.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into the array.
        std::str::from_utf8(&self.0).expect("hex is ASCII")
    }

    /// The key of the token's cached session.
    pub fn entry_key(&self) -> String {
        format!("{ENTRY_PREFIX}{}", self.as_str())
    }

    /// The key of the token's logout tombstone, in its entry's Cluster slot:
    /// `session_revoked:{session_cache:<hash>}`.
    pub fn tombstone_key(&self) -> String {
        format!("{TOMBSTONE_PREFIX}{{{ENTRY_PREFIX}{}}}", self.as_str())
    }

    /// The key that says the identity provider refused the token, in its entry's
    /// Cluster slot: `session_refused:{session_cache:<hash>}`.
    pub fn refused_key(&self) -> String {
        format!("{REFUSED_PREFIX}{{{ENTRY_PREFIX}{}}}", self.as_str())
    }

    /// The key of the user that the identity provider's session id hashed as `self`
    /// belongs to: `session_sid:<hash>`. One key, on its own, so plain commands reach it
    /// in Cluster too.
    pub fn session_id_key(&self) -> String {
        format!("{SESSION_ID_PREFIX}{}", self.as_str())
    }

    /// The tombstone's name before it moved into its entry's slot,
    /// `session_revoked:<hash>`. Outside Cluster (the only place a release before the
    /// rename ran) it is still written and honoured, so that a rolling upgrade loses no
    /// logout; it can go once no such release runs and `--ttl-seconds` has passed.
    pub fn legacy_tombstone_key(&self) -> String {
        format!("{TOMBSTONE_PREFIX}{}", self.as_str())
    }

    /// The part of the hash that log lines may show.
    pub fn short(&self) -> &str {
        &self.as_str()[..LOG_CHARS]
    }
}

/// Shows only the short form, so that a stray `{:?}` cannot log more than a log line may.
impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", self.short())
    }
}

/// How tokens become hashes.
#[derive(Clone, Default)]
pub enum TokenHasher {
    /// Plain SHA-256: the Python service's keys, readable by both.
    #[default]
    Sha256,
    /// HMAC-SHA256 under a secret: a dump of Redis cannot be checked against guessed
    /// or leaked tokens without the secret. The Python service cannot read these keys.
    Hmac(Hmac<Sha256>),
}

impl TokenHasher {
    /// Keyed hashing under `secret`.
    pub fn hmac(secret: &[u8]) -> Self {
        TokenHasher::Hmac(Hmac::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }

    /// The hash that stands for `token`.
    pub fn hash(&self, token: &str) -> TokenHash {
        match self {
            TokenHasher::Sha256 => TokenHash::of(token),
            TokenHasher::Hmac(mac) => {
                let mut mac = mac.clone();
                mac.update(token.as_bytes());
                TokenHash::from_digest(&mac.finalize().into_bytes())
            }
        }
    }
}

impl fmt::Debug for TokenHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenHasher::Sha256 => "sha256",
            TokenHasher::Hmac(_) => "hmac-sha256",
        })
    }
}

/// The key of a user's invalidation marker.
pub fn marker_key(user_id: &str) -> String {
    format!("{MARKER_PREFIX}{user_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is the one Python computes: `hashlib.sha256(token.encode()).hexdigest()[:32]`.
    #[test]
    fn matches_python_hash() {
        // python3 -c 'import hashlib; print(hashlib.sha256("abc".encode()).hexdigest()[:32])'
        assert_eq!(
            TokenHash::of("abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223"
        );
        assert_eq!(
            TokenHash::of("abc").entry_key(),
            "session_cache:ba7816bf8f01cfea414140de5dae2223"
        );
        assert_eq!(marker_key("u1"), "user_invalidated:u1");
        assert_eq!(
            TokenHash::of("abc").tombstone_key(),
            "session_revoked:{session_cache:ba7816bf8f01cfea414140de5dae2223}"
        );
    }

    /// Keyed hashing differs from plain hashing and depends on the secret
    /// (RFC 4231 test case 2: key "Jefe").
    #[test]
    fn hmac_hash() {
        let hashed = TokenHasher::hmac(b"Jefe").hash("what do ya want for nothing?");
        assert_eq!(hashed.as_str(), "5bdcc146bf60754e6a042426089575c7");
        assert_ne!(
            TokenHasher::hmac(b"other").hash("abc"),
            TokenHash::of("abc")
        );
        assert_eq!(TokenHasher::Sha256.hash("abc"), TokenHash::of("abc"));
    }

    /// A token's entry and tombstone share a Cluster slot, whatever the token (SPEC §8).
    #[test]
    fn tombstone_shares_the_entry_slot() {
        use bb8_redis::redis::cluster_routing::Slot;
        for token in ["abc", "tok", "another token"] {
            let hash = TokenHash::of(token);
            assert_eq!(
                Slot::for_key(hash.tombstone_key()),
                Slot::for_key(hash.entry_key()),
                "{token}"
            );
        }
    }

    /// Debug output never carries the whole hash.
    #[test]
    fn debug_is_short() {
        let shown = format!("{:?}", TokenHash::of("abc"));
        assert!(shown.contains("ba7816bf8f01cfea"));
        assert!(!shown.contains("ba7816bf8f01cfea414140de5dae2223"));
    }
}
