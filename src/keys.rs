//! Token hashing and the Redis key names shared with the Python service.
//!
//! A token never leaves this module in clear: every key, log line and metric names a
//! token by the first 32 hex characters of its SHA-256, exactly as the Python service
//! does, so that both can read each other's entries during a migration.

use std::fmt;

use sha2::{Digest, Sha256};

/// Prefix of a cached session: `session_cache:<hash>` (the Python service's layout).
pub const ENTRY_PREFIX: &str = "session_cache:";
/// Prefix of a user's invalidation marker: `user_invalidated:<user_id>` (the Python
/// service's layout).
pub const MARKER_PREFIX: &str = "user_invalidated:";
/// Prefix of a logout tombstone: `session_revoked:<hash>` (new in this service).
pub const TOMBSTONE_PREFIX: &str = "session_revoked:";

/// How many hex characters of the hash a log line may show.
const LOG_CHARS: usize = 16;

/// The 32 lowercase hex characters that stand for a token everywhere outside the
/// request: the first half of its SHA-256.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a token's UTF-8 bytes.
    pub fn of(token: &str) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(token.as_bytes());
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

    /// The key of the token's logout tombstone.
    pub fn tombstone_key(&self) -> String {
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
    }

    /// Debug output never carries the whole hash.
    #[test]
    fn debug_is_short() {
        let shown = format!("{:?}", TokenHash::of("abc"));
        assert!(shown.contains("ba7816bf8f01cfea"));
        assert!(!shown.contains("ba7816bf8f01cfea414140de5dae2223"));
    }
}
