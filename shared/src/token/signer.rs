//! The [`Signer`]: every key derived once from the configured [`Keys`], and the
//! minting and verifying of each token kind (`v1`, itsdangerous, PROOF) with them.
//!
//! The formats themselves live beside it: the `v1` payload in `v1`, itsdangerous
//! signing and zlib in `itsdangerous`; what a token says about itself in `inspect`.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac;
use hmac::digest::KeyInit;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Digest as _;
use sha2::Sha256;
use time::OffsetDateTime;

use super::claims::{
    Claims, LegacyClaims, Malformation, ProofPayload, TokenError, check_v1_expiry,
};
use super::code::{derive_code_key, hash_with};
use super::itsdangerous::{LegacyMac, dumps_json, open_legacy, unsign};
use super::names::Digest;
use super::pyjson::{py_json, py_json_str};
use super::v1::{decode_claims, decode_signature, encode_claims};
use super::{
    HmacSha256, MAX_TOKEN_LEN, PROOF_MAX_AGE_SECONDS, PROOF_SALT_SUFFIX, V1_KEY_LABEL, V1_KID_LEN,
    V1_PREFIX, V1_SIG_LEN,
};

/// The secrets and salt tokens are signed with; `Debug` never shows a secret.
#[derive(Clone)]
pub struct Keys {
    current: SecretString,
    old: Vec<SecretString>,
    salt: String,
}

impl Keys {
    /// `current` signs and verifies, `old` (retired secrets) only verify; `salt` as in itsdangerous.
    pub fn new(current: SecretString, old: Vec<SecretString>, salt: String) -> Self {
        Self { current, old, salt }
    }

    /// The salt (not a secret: itsdangerous treats it as a namespace).
    pub fn salt(&self) -> &str {
        &self.salt
    }

    /// Every secret, current first.
    fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .map(|s| s.expose_secret().as_bytes())
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("current", &"[REDACTED]")
            .field("old", &format_args!("[{} REDACTED]", self.old.len()))
            .field("salt", &self.salt)
            .finish()
    }
}

/// Mints and verifies every token kind with keys derived once from [`Keys`].
///
/// Cheap to clone (an `Arc`); `Debug` shows the salt, digest and key ids only.
#[derive(Clone)]
pub struct Signer {
    inner: Arc<SignerInner>,
}

struct SignerInner {
    /// Kept for the generic itsdangerous helpers, which accept any salt.
    keys: Keys,
    digest: Digest,
    /// One per secret, current first.
    v1: Vec<V1Key>,
    /// itsdangerous keys for the configured salt, one per secret, current first.
    legacy_sha1: Vec<LegacyMac>,
    legacy_sha256: Vec<LegacyMac>,
    /// itsdangerous SHA-256 keys for `salt + ".proof"`, current first.
    proof: Vec<LegacyMac>,
    proof_salt: String,
    /// Code-hash keys, one per secret, current first.
    code: Vec<HmacSha256>,
}

#[derive(Clone)]
struct V1Key {
    kid: String,
    mac: HmacSha256,
}

impl Signer {
    /// Derives every key: `v1` keys, itsdangerous keys for both digests, PROOF keys.
    pub fn new(keys: &Keys, digest: Digest) -> Self {
        let salt = keys.salt.as_bytes();
        let proof_salt = format!("{}{PROOF_SALT_SUFFIX}", keys.salt);
        let legacy = |salt: &[u8], digest| -> Vec<LegacyMac> {
            keys.secrets()
                .map(|secret| LegacyMac::derive(secret, salt, digest))
                .collect()
        };
        let inner = SignerInner {
            v1: keys
                .secrets()
                .map(|secret| V1Key::derive(secret, salt))
                .collect(),
            legacy_sha1: legacy(salt, Digest::Sha1),
            legacy_sha256: legacy(salt, Digest::Sha256),
            proof: legacy(proof_salt.as_bytes(), Digest::Sha256),
            proof_salt,
            code: keys
                .secrets()
                .map(|secret| derive_code_key(secret, salt))
                .collect(),
            keys: keys.clone(),
            digest,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The configured salt.
    pub fn salt(&self) -> &str {
        &self.inner.keys.salt
    }

    /// The digest itsdangerous tokens are minted and verified with.
    pub fn digest(&self) -> Digest {
        self.inner.digest
    }

    /// The key id of the current secret, as it appears in `v1` tokens (safe to log).
    pub fn current_kid(&self) -> &str {
        self.inner.v1.first().map_or("", |key| key.kid.as_str())
    }

    // ----- v1 -----

    /// Mints a `v1` token with the current key.
    ///
    /// Claims within the contract's field limits always fit in [`MAX_TOKEN_LEN`]; a token
    /// minted from larger claims, or from timestamps outside 1970..=9999, will not verify.
    pub fn mint_v1(&self, claims: &Claims) -> String {
        // `new` always derives the current key; an empty list cannot happen.
        let Some(key) = self.inner.v1.first() else {
            return String::new();
        };
        let payload = encode_claims(claims);
        let mut token = String::with_capacity(
            V1_PREFIX.len() + V1_KID_LEN + 2 + payload.len().div_ceil(3) * 4 + V1_SIG_LEN,
        );
        token.push_str(V1_PREFIX);
        token.push_str(&key.kid);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let mut mac = key.mac.clone();
        mac.update(token.as_bytes());
        let tag = mac.finalize().into_bytes();
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        token
    }

    /// Verifies a `v1` token (any configured key) and that `now < expires_at`.
    pub fn verify_v1(&self, token: &str, now: OffsetDateTime) -> Result<Claims, TokenError> {
        let claims = self.open_v1(token)?;
        check_v1_expiry(claims, now)
    }

    /// Like [`Signer::verify_v1`], and the token must be for `purpose`.
    ///
    /// The purpose is checked before expiry: an expired token for another purpose is
    /// [`TokenError::WrongPurpose`], so its claims never reach the wrong handler.
    pub fn verify_v1_for(
        &self,
        token: &str,
        purpose: &str,
        now: OffsetDateTime,
    ) -> Result<Claims, TokenError> {
        let claims = self.open_v1(token)?;
        if claims.purpose != purpose {
            return Err(TokenError::WrongPurpose);
        }
        check_v1_expiry(claims, now)
    }

    /// Checks shape, key and signature, and decodes the claims; no clock involved.
    pub(super) fn open_v1(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Malformation::TooLong.into());
        }
        let rest = token
            .strip_prefix(V1_PREFIX)
            .ok_or(Malformation::Structure)?;
        let mut parts = rest.split('.');
        let (Some(kid), Some(payload), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Malformation::Structure.into());
        };
        if kid.len() != V1_KID_LEN {
            return Err(Malformation::Structure.into());
        }
        let sig = decode_signature(sig, V1_SIG_LEN)?;
        // Everything before the last dot is signed.
        let signed = &token.as_bytes()[..token.len() - V1_SIG_LEN - 1];

        let mut known_kid = false;
        for key in self.inner.v1.iter().filter(|key| key.kid == kid) {
            known_kid = true;
            let mut mac = key.mac.clone();
            mac.update(signed);
            // `verify_slice` compares in constant time.
            if mac.verify_slice(&sig).is_ok() {
                let bytes = URL_SAFE_NO_PAD
                    .decode(payload)
                    .map_err(|_| Malformation::Payload)?;
                return decode_claims(&bytes).map_err(TokenError::Malformed);
            }
        }
        Err(if known_kid {
            TokenError::BadSignature
        } else {
            TokenError::UnknownKey
        })
    }

    // ----- itsdangerous -----

    /// `URLSafeTimedSerializer(SECRET).dumps(email, salt=SALT)` with the configured
    /// digest and the current secret, stamped `now`.
    pub fn mint_itsdangerous(&self, email: &str, now: OffsetDateTime) -> String {
        let mut json = String::with_capacity(email.len() + 2);
        py_json_str(email, &mut json);
        dumps_json(self.legacy_macs(self.inner.digest), json.as_bytes(), now)
    }

    /// `.loads(token, salt=SALT, max_age=max_age_seconds)` with the configured digest
    /// and every configured secret.
    pub fn verify_itsdangerous(
        &self,
        token: &str,
        max_age_seconds: u64,
        now: OffsetDateTime,
    ) -> Result<LegacyClaims, TokenError> {
        let macs = self.legacy_macs(self.inner.digest);
        let value = unsign(macs, token)?;
        let (payload, issued_at) = open_legacy(value, max_age_seconds, now)?;
        Ok(LegacyClaims::new(payload, issued_at))
    }

    /// `URLSafeTimedSerializer(SECRET, signer_kwargs={"digest_method": digest}).dumps(value, salt=salt)`
    /// with the current secret.
    ///
    /// Objects are written in the map's iteration order (sorted keys unless serde_json's
    /// `preserve_order` feature is on) where Python keeps insertion order; a payload
    /// whose key order matters gets its own writer, as [`Signer::mint_proof`] has.
    pub fn dumps_itsdangerous_with(
        &self,
        value: &Value,
        salt: &str,
        digest: Digest,
        now: OffsetDateTime,
    ) -> String {
        let mut json = String::new();
        py_json(value, &mut json);
        dumps_json(&self.legacy_macs_for(salt, digest), json.as_bytes(), now)
    }

    /// `.loads(token, salt=salt, max_age=max_age_seconds, return_timestamp=True)` with
    /// `digest` and every configured secret.
    pub fn loads_itsdangerous_with(
        &self,
        token: &str,
        salt: &str,
        digest: Digest,
        max_age_seconds: u64,
        now: OffsetDateTime,
    ) -> Result<(Value, OffsetDateTime), TokenError> {
        let macs = self.legacy_macs_for(salt, digest);
        let value = unsign(&macs, token)?;
        open_legacy(value, max_age_seconds, now)
    }

    /// The contract's PROOF: `dumps({"request_id", "user_id", "email", "purpose"},
    /// salt=SALT + ".proof")` with SHA-256, keys in that order.
    pub fn mint_proof(&self, proof: &ProofPayload, now: OffsetDateTime) -> String {
        let json = proof.to_python_json();
        dumps_json(&self.inner.proof, json.as_bytes(), now)
    }

    /// Checks a PROOF as `.loads(proof, salt=SALT + ".proof", max_age=900)` would.
    pub fn verify_proof(
        &self,
        proof: &str,
        now: OffsetDateTime,
    ) -> Result<ProofPayload, TokenError> {
        let value = unsign(&self.inner.proof, proof)?;
        let (payload, _) = open_legacy(value, PROOF_MAX_AGE_SECONDS, now)?;
        serde_json::from_value(payload).map_err(|_| Malformation::Claims.into())
    }

    // ----- codes -----

    /// The keyed hash stored for `code`, mailed for `request_id` (current key).
    pub fn code_hash(&self, request_id: &str, code: &str) -> Vec<u8> {
        match self.inner.code.first() {
            Some(key) => hash_with(key, request_id, code)
                .finalize()
                .into_bytes()
                .to_vec(),
            None => Vec::new(),
        }
    }

    /// Whether `code` hashes to `stored` for `request_id` under the current
    /// or a retired key; each comparison takes constant time.
    pub fn code_matches(&self, request_id: &str, code: &str, stored: &[u8]) -> bool {
        // Every key is tried (no early exit), so the time says nothing about
        // which key, if any, matched.
        self.inner.code.iter().fold(false, |found, key| {
            hash_with(key, request_id, code)
                .verify_slice(stored)
                .is_ok()
                | found
        })
    }

    pub(super) fn legacy_macs(&self, digest: Digest) -> &[LegacyMac] {
        match digest {
            Digest::Sha1 => &self.inner.legacy_sha1,
            Digest::Sha256 => &self.inner.legacy_sha256,
        }
    }

    /// Precomputed keys when `salt` is one we know, otherwise derived now.
    fn legacy_macs_for(&self, salt: &str, digest: Digest) -> Cow<'_, [LegacyMac]> {
        if salt == self.inner.keys.salt {
            Cow::Borrowed(self.legacy_macs(digest))
        } else if salt == self.inner.proof_salt && digest == Digest::Sha256 {
            Cow::Borrowed(&self.inner.proof)
        } else {
            Cow::Owned(
                self.inner
                    .keys
                    .secrets()
                    .map(|secret| LegacyMac::derive(secret, salt.as_bytes(), digest))
                    .collect(),
            )
        }
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.inner.v1.iter().map(|key| key.kid.as_str()).collect();
        f.debug_struct("Signer")
            .field("salt", &self.inner.keys.salt)
            .field("digest", &self.inner.digest)
            .field("v1_kids", &kids)
            .finish_non_exhaustive()
    }
}

impl V1Key {
    fn derive(secret: &[u8], salt: &[u8]) -> Self {
        let mut kdf = keyed_mac::<HmacSha256>(secret);
        kdf.update(V1_KEY_LABEL);
        kdf.update(salt);
        let key = kdf.finalize().into_bytes();
        let id = Sha256::digest(key);
        Self {
            kid: URL_SAFE_NO_PAD.encode(&id[..6]),
            mac: keyed_mac(&key),
        }
    }
}

/// A keyed HMAC; HMAC takes keys of any length, so this cannot fail.
pub(super) fn keyed_mac<M: Mac + KeyInit>(key: &[u8]) -> M {
    match <M as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::fixtures::signer;

    #[test]
    fn the_kid_is_eight_url_safe_characters_and_differs_per_secret_and_salt() {
        let a = signer("one", &[], "s", Digest::Sha1);
        let b = signer("two", &[], "s", Digest::Sha1);
        let c = signer("one", &[], "t", Digest::Sha1);
        assert_eq!(a.current_kid().len(), V1_KID_LEN);
        assert_ne!(a.current_kid(), b.current_kid());
        assert_ne!(a.current_kid(), c.current_kid());
    }

    #[test]
    fn a_signer_can_be_shared_across_tasks() {
        fn shareable<T: Clone + Send + Sync + fmt::Debug + 'static>() {}
        shareable::<Signer>();
        shareable::<Keys>();
        shareable::<TokenError>();
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let s = signer("hunter2-secret", &["old-secret-xyz"], "salt", Digest::Sha1);
        let keys = Keys::new(
            "hunter2-secret".into(),
            vec!["old-secret-xyz".into()],
            "salt".into(),
        );
        for text in [format!("{s:?}"), format!("{keys:?}")] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("old-secret"), "{text}");
        }
    }
}
