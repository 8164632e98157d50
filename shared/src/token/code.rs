//! One-time codes mailed beside (or instead of) the link.
//!
//! A code is `CODE_LENGTH` decimal digits drawn from the thread's CSPRNG
//! (`rand::rng()`: ChaCha, seeded from the operating system). Only a keyed
//! hash of it is stored: `HMAC-SHA256(key, request_id ‖ 0x00 ‖ code)` under a
//! key derived from each secret (`HMAC-SHA256(secret, "verimail/code/" ‖
//! salt)`), so a copy of the database alone does not let anyone test a
//! million guesses offline, and binding the request id makes one code's hash
//! useless for any other mail. Hashes are checked with `Mac::verify_slice`
//! (constant time), against the current key and each retired one.

use std::fmt;

use hmac::Mac;
use rand::Rng;

use super::HmacSha256;
use super::signer::keyed_mac;

/// Label of the code-hash key derivation (keeps it apart from token keys).
pub(super) const CODE_KEY_LABEL: &[u8] = b"verimail/code/";

/// A freshly generated code. `Debug` hides the digits, so a code put in a
/// log line by mistake shows no secret; [`Code::digits`] is for the mail.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

impl Code {
    /// `length` random decimal digits from a CSPRNG.
    pub fn generate(length: u8) -> Self {
        let mut rng = rand::rng();
        Self(
            (0..length)
                .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                .collect(),
        )
    }

    /// The digits, to show in the mail.
    pub fn digits(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code([{} digits])", self.0.len())
    }
}

/// The code-hash key of one secret.
pub(super) fn derive_code_key(secret: &[u8], salt: &[u8]) -> HmacSha256 {
    let mut kdf = keyed_mac::<HmacSha256>(secret);
    kdf.update(CODE_KEY_LABEL);
    kdf.update(salt);
    keyed_mac(&kdf.finalize().into_bytes())
}

/// The keyed hash of `code` mailed for `request_id` under `key`.
pub(super) fn hash_with(key: &HmacSha256, request_id: &str, code: &str) -> HmacSha256 {
    let mut mac = key.clone();
    mac.update(request_id.as_bytes());
    mac.update(&[0]);
    mac.update(code.as_bytes());
    mac
}

/// Whether `code` is a well-formed code: 6 to 10 ASCII digits (what
/// `CODE_LENGTH` allows), so a malformed one is refused before any lookup.
pub fn well_formed(code: &str) -> bool {
    (6..=10).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::fixtures::signer;
    use crate::token::names::Digest;

    #[test]
    fn codes_have_the_asked_length_of_digits_and_vary() {
        for length in 6..=10 {
            let code = Code::generate(length);
            assert_eq!(code.digits().len(), usize::from(length));
            assert!(well_formed(code.digits()), "{}", code.digits());
        }
        // 20 six-digit codes all equal would mean no randomness at all.
        let first = Code::generate(6);
        assert!((0..20).any(|_| Code::generate(6) != first));
        // Every digit turns up: the digits are not drawn from a narrow range.
        let all: String = (0..200).map(|_| Code::generate(10).0).collect();
        for d in '0'..='9' {
            assert!(all.contains(d), "{d} never drawn");
        }
    }

    #[test]
    fn a_code_never_shows_in_debug_output() {
        let code = Code("123456".into());
        assert_eq!(format!("{code:?}"), "Code([6 digits])");
    }

    #[test]
    fn the_hash_binds_code_request_and_key_and_old_keys_still_verify() {
        let s = signer("secret", &[], "salt", Digest::Sha1);
        let hash = s.code_hash("req-1", "123456");
        assert_eq!(hash.len(), 32);
        assert!(s.code_matches("req-1", "123456", &hash));
        assert!(!s.code_matches("req-1", "123457", &hash));
        assert!(!s.code_matches("req-2", "123456", &hash));
        assert!(!s.code_matches("req-1", "123456", &hash[..31]));
        // The separator keeps ("req-1", "23456…") apart from ("req-12", "3456…").
        assert_ne!(
            s.code_hash("req-1", "234567"),
            s.code_hash("req-12", "34567")
        );
        let other = signer("another", &[], "salt", Digest::Sha1);
        assert!(!other.code_matches("req-1", "123456", &hash));
        let rotated = signer("new-secret", &["secret"], "salt", Digest::Sha1);
        assert!(rotated.code_matches("req-1", "123456", &hash));
        let resalted = signer("secret", &[], "pepper", Digest::Sha1);
        assert!(!resalted.code_matches("req-1", "123456", &hash));
    }

    #[test]
    fn only_six_to_ten_digits_are_well_formed() {
        for good in ["000000", "1234567890"] {
            assert!(well_formed(good), "{good}");
        }
        for bad in [
            "",
            "12345",
            "12345678901",
            "12345a",
            " 123456",
            "１２３４５６",
            "-12345",
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }
}
