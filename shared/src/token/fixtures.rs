//! Test fixtures shared by the token modules' unit tests.

use secrecy::SecretString;
use time::macros::datetime;

use super::{Claims, Digest, Keys, Signer};

pub(super) fn signer(secret: &str, old: &[&str], salt: &str, digest: Digest) -> Signer {
    let keys = Keys::new(
        SecretString::from(secret),
        old.iter().map(|&s| SecretString::from(s)).collect(),
        salt.to_owned(),
    );
    Signer::new(&keys, digest)
}

pub(super) fn claims() -> Claims {
    Claims {
        request_id: "5f1c".into(),
        user_id: "42".into(),
        email: "alice@example.com".into(),
        purpose: "verify_email".into(),
        locale: Some("zh-CN".into()),
        issued_at: datetime!(2026-11-24 10:00:00 UTC),
        expires_at: datetime!(2026-11-24 11:00:00 UTC),
    }
}
