//! The gateway's API keys (`GATEWAY_API_KEYS`), checked in constant time.
//!
//! Each key is kept only as `HMAC-SHA256(k, key)` under a key `k` drawn at
//! start from the CSPRNG; a presented key is hashed the same way and compared
//! with `Mac::verify_slice` (constant time) against every configured key,
//! without stopping at a match. Hashing first makes every comparison 32 bytes
//! long, so neither the length nor the content of a key leaks through timing.

use std::fmt;

use hmac::Mac;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};

use super::HmacSha256;
use super::signer::keyed_mac;

/// The accepted API keys; `Debug` shows only how many there are.
#[derive(Clone)]
pub struct ApiKeys {
    mac: HmacSha256,
    hashes: Vec<Vec<u8>>,
}

impl ApiKeys {
    /// The keys to accept; none: [`ApiKeys::accepts`] refuses everything.
    pub fn new(keys: &[SecretString]) -> Self {
        let mut k = [0u8; 32];
        rand::rng().fill(&mut k);
        let mac = keyed_mac::<HmacSha256>(&k);
        let hashes = keys
            .iter()
            .map(|key| {
                let mut m = mac.clone();
                m.update(key.expose_secret().as_bytes());
                m.finalize().into_bytes().to_vec()
            })
            .collect();
        Self { mac, hashes }
    }

    /// Whether `presented` is one of the keys.
    pub fn accepts(&self, presented: &str) -> bool {
        self.hashes.iter().fold(false, |found, hash| {
            let mut m = self.mac.clone();
            m.update(presented.as_bytes());
            m.verify_slice(hash).is_ok() | found
        })
    }

    /// Whether no key is configured (the API refuses everyone).
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys([{} keys])", self.hashes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_keys_are_accepted() {
        let keys = ApiKeys::new(&[
            SecretString::from("key-one-0123456789"),
            SecretString::from("key-two-0123456789"),
        ]);
        assert!(keys.accepts("key-one-0123456789"));
        assert!(keys.accepts("key-two-0123456789"));
        for wrong in [
            "",
            "key-one-012345678",
            "key-one-01234567890",
            "KEY-ONE-0123456789",
        ] {
            assert!(!keys.accepts(wrong), "{wrong}");
        }
        assert!(!format!("{keys:?}").contains("key-one"));
    }

    #[test]
    fn no_keys_accept_nobody() {
        let keys = ApiKeys::new(&[]);
        assert!(keys.is_empty());
        assert!(!keys.accepts(""));
        assert!(!keys.accepts("anything-at-all-here"));
    }
}
