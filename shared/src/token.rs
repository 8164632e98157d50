//! Signed links: verimail's own `v1` tokens, and tokens compatible with Python's
//! itsdangerous (`URLSafeTimedSerializer`).
//!
//! A [`Signer`] is built once from the configured [`Keys`] (current secret, retired
//! secrets, salt) and the itsdangerous [`Digest`]; it derives every key up front so
//! minting and verifying only clone a keyed HMAC state. Time is always passed in
//! (`now`), never read from the clock, so every rule here is testable.
//!
//! # The `v1` layout
//!
//! ```text
//! v1.{kid}.{payload}.{sig}
//! ```
//!
//! Four parts separated by `.`, each part (after the literal `v1`) unpadded
//! base64url, so a token only contains `[A-Za-z0-9_.-]` and needs no escaping in a URL.
//!
//! - The signing key (not in the token) is `HMAC-SHA256(key = secret, msg = "verimail/v1/" ‖ salt)`,
//!   one per secret (current and retired), so the same secret used with another salt
//!   or by another format never produces a valid `v1` signature.
//! - `kid` (8 characters): base64url of the first 6 bytes of `SHA-256(key)`. It lets
//!   the verifier pick the key among the current and retired ones without trying
//!   them all; a kid matching no configured key is [`TokenError::UnknownKey`]. It
//!   reveals nothing about the secret (a hash of a derived key) and is not secret.
//! - `payload`: a compact binary record, base64url:
//!   `flags:u8` (bit 0: a locale follows; other bits must be 0),
//!   `iat` (unix seconds, zigzag LEB128 varint),
//!   `lifetime` (`exp - iat` in seconds, zigzag LEB128 varint),
//!   then `request_id`, `user_id`, `email`, `purpose` and, when flagged, `locale`,
//!   each a LEB128 byte length followed by UTF-8. No trailing bytes.
//! - `sig` (43 characters): `HMAC-SHA256(key, "v1.{kid}.{payload}")`, all 32 bytes,
//!   so the version and the kid are authenticated too. Compared in constant time.
//!
//! Verification order: length (at most [`MAX_TOKEN_LEN`] bytes, checked before any
//! work) and shape, then the kid, then the signature, then the payload, then (for
//! [`Signer::verify_v1_for`]) the purpose, then expiry. A token is valid while
//! `now < expires_at`: `expires_at` is the first instant it is refused, as JWT's `exp`.
//! Timestamps are whole seconds (sub-seconds are dropped when minting) and must lie
//! in 1970..=9999; anything else fails as [`Malformation::Timestamp`].
//!
//! # itsdangerous
//!
//! [`Signer::mint_itsdangerous`] is byte for byte what
//! `URLSafeTimedSerializer(SECRET).dumps(email, salt=SALT)` produces with the configured
//! digest, and [`Signer::verify_itsdangerous`] accepts what `.loads(token, salt=SALT,
//! max_age=TTL)` accepts (current and retired keys), with three deliberate differences,
//! all about input no signer ever produces:
//! - the signature must be canonical unpadded base64url. Python's decoder also accepts
//!   junk characters, padding, and a last character whose unused bits are set, so a
//!   token edited that way still passes `.loads`; here it fails.
//! - a token is at most [`MAX_TOKEN_LEN`] bytes and a compressed payload inflates to at
//!   most [`MAX_DECOMPRESSED_LEN`] bytes (a zip bomb is refused, not inflated).
//! - JSON that Python reads but serde_json does not (`NaN`, `Infinity`, lone
//!   surrogates, UTF-16) fails as [`Malformation::Json`]; integers beyond 64 bits come
//!   back as floats.
//!
//! Byte-identical *compressed* tokens need the reference C zlib at level 6, what
//! CPython links against: the crate enables flate2's `zlib` feature for that
//! (miniz_oxide and zlib-rs produce other, equally valid, bytes).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha1::Sha1;
use sha2::Digest as _;
use sha2::Sha256;
use time::OffsetDateTime;

/// Longest token accepted, in bytes; longer input is refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Largest payload a compressed itsdangerous token may inflate to, in bytes.
pub const MAX_DECOMPRESSED_LEN: usize = 64 * 1024;
/// Suffix appended to the configured salt for the PROOF of single-use confirmations.
pub const PROOF_SALT_SUFFIX: &str = ".proof";
/// How long a PROOF is valid, in seconds.
pub const PROOF_MAX_AGE_SECONDS: u64 = 900;

const V1_PREFIX: &str = "v1.";
const V1_KEY_LABEL: &[u8] = b"verimail/v1/";
const V1_KID_LEN: usize = 8;
const V1_SIG_LEN: usize = 43;
const V1_FLAG_LOCALE: u8 = 1;
/// 9999-12-31T23:59:59Z: the last instant RFC 3339 (four-digit years) can express.
const MAX_UNIX_SECONDS: i64 = 253_402_300_799;
/// What CPython's `zlib.compress` uses by default (`Z_DEFAULT_COMPRESSION`).
const ZLIB_LEVEL: u32 = 6;

type HmacSha1 = Hmac<Sha1>;
type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------
// Names read from configuration
// ---------------------------------------------------------------------------

/// The format the worker mints (`TOKEN_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenFormat {
    /// verimail's own format (see the module documentation).
    #[default]
    V1,
    /// `URLSafeTimedSerializer(SECRET).dumps(email, salt=SALT)`.
    Itsdangerous,
}

impl TokenFormat {
    /// The configuration spelling: `v1` or `itsdangerous`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::Itsdangerous => "itsdangerous",
        }
    }
}

impl fmt::Display for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TokenFormat {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(Self::V1),
            "itsdangerous" => Ok(Self::Itsdangerous),
            _ => Err(ParseNameError::new(
                "token format",
                "`v1` or `itsdangerous`",
            )),
        }
    }
}

/// The hash itsdangerous signs with (`ITSDANGEROUS_DIGEST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Digest {
    /// HMAC-SHA1 with a SHA-1 derived key: itsdangerous' default.
    #[default]
    Sha1,
    /// HMAC-SHA256 with a SHA-256 derived key.
    Sha256,
}

impl Digest {
    /// The configuration spelling: `sha1` or `sha256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Sha1 => Self::Sha256,
            Self::Sha256 => Self::Sha1,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Digest {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            _ => Err(ParseNameError::new("digest", "`sha1` or `sha256`")),
        }
    }
}

/// A configuration value that names no [`TokenFormat`] or [`Digest`].
///
/// The message leaves the value out: the caller names the variable and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what}, expected {expected}")]
pub struct ParseNameError {
    what: &'static str,
    expected: &'static str,
}

impl ParseNameError {
    fn new(what: &'static str, expected: &'static str) -> Self {
        Self { what, expected }
    }
}

// ---------------------------------------------------------------------------
// Keys and the signer
// ---------------------------------------------------------------------------

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
    fn open_v1(&self, token: &str) -> Result<Claims, TokenError> {
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

    fn legacy_macs(&self, digest: Digest) -> &[LegacyMac] {
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

    // ----- inspection -----

    /// Says what a token is and whether it holds, whatever format is configured.
    ///
    /// `v1` tokens are checked with their own expiry; itsdangerous tokens with
    /// `ttl_seconds` as `max_age`, under both digests so the answer names the one
    /// that signed it.
    pub fn inspect(&self, token: &str, ttl_seconds: u64, now: OffsetDateTime) -> Inspection {
        if looks_like_v1(token) {
            return match self.open_v1(token) {
                Ok(claims) => Inspection {
                    status: if now < claims.expires_at {
                        InspectionStatus::Valid
                    } else {
                        InspectionStatus::Expired
                    },
                    format: Some(TokenFormat::V1),
                    digest: None,
                    issued_at: Some(claims.issued_at),
                    expires_at: Some(claims.expires_at),
                    payload: serde_json::to_value(&claims).ok(),
                    reason: None,
                },
                Err(error) => Inspection::invalid(Some(TokenFormat::V1), None, &error),
            };
        }

        let mut refusal = None;
        for digest in [self.inner.digest, self.inner.digest.other()] {
            let value = match unsign(self.legacy_macs(digest), token) {
                Ok(value) => value,
                Err(error) => {
                    // A signature of the wrong length for one digest is no news when it has
                    // the right length for the other: report the more telling refusal.
                    if refusal.is_none() || error == TokenError::BadSignature {
                        refusal = Some(error);
                    }
                    continue;
                }
            };
            // The signature holds under `digest`: whatever follows is the answer.
            let with_ttl = |issued_at: OffsetDateTime| {
                i64::try_from(ttl_seconds)
                    .ok()
                    .and_then(|ttl| issued_at.checked_add(time::Duration::seconds(ttl)))
            };
            return match open_legacy(value, ttl_seconds, now) {
                Ok((payload, issued_at)) => Inspection {
                    status: InspectionStatus::Valid,
                    format: Some(TokenFormat::Itsdangerous),
                    digest: Some(digest),
                    payload: Some(payload),
                    issued_at: Some(issued_at),
                    expires_at: with_ttl(issued_at),
                    reason: None,
                },
                Err(TokenError::Expired(expired)) => {
                    let (payload, issued_at) = match *expired {
                        ExpiredToken::Itsdangerous { payload, issued_at } => {
                            (payload, Some(issued_at))
                        }
                        ExpiredToken::V1(_) => (None, None),
                    };
                    Inspection {
                        status: InspectionStatus::Expired,
                        format: Some(TokenFormat::Itsdangerous),
                        digest: Some(digest),
                        payload,
                        issued_at,
                        expires_at: issued_at.and_then(with_ttl),
                        reason: None,
                    }
                }
                Err(error) => {
                    Inspection::invalid(Some(TokenFormat::Itsdangerous), Some(digest), &error)
                }
            };
        }
        let format = looks_like_itsdangerous(token).then_some(TokenFormat::Itsdangerous);
        let error = refusal.unwrap_or(TokenError::BadSignature);
        Inspection::invalid(format, None, &error)
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
fn keyed_mac<M: Mac + KeyInit>(key: &[u8]) -> M {
    match <M as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// Free-function form of [`Signer::inspect`] (what `verimail token inspect` prints).
pub fn inspect(signer: &Signer, token: &str, ttl_seconds: u64, now: OffsetDateTime) -> Inspection {
    signer.inspect(token, ttl_seconds, now)
}

/// A cheap test of the `v1.` prefix and four dot-separated parts; says nothing of validity.
pub fn looks_like_v1(token: &str) -> bool {
    token.starts_with(V1_PREFIX) && token.bytes().filter(|&b| b == b'.').count() == 3
}

/// `payload.timestamp.signature` (payload optionally `.`-prefixed), URL-safe characters only.
fn looks_like_itsdangerous(token: &str) -> bool {
    let body = token.strip_prefix('.').unwrap_or(token);
    let parts: Vec<&str> = body.split('.').collect();
    parts.len() == 3
        && !parts[0].is_empty()
        && !parts[2].is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

// ---------------------------------------------------------------------------
// Claims and errors
// ---------------------------------------------------------------------------

/// What a `v1` token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The request's CloudEvent `id`.
    pub request_id: String,
    /// The user, as a string.
    pub user_id: String,
    /// The address being verified.
    pub email: String,
    /// What the link is for (`verify_email`, `reset_password`).
    pub purpose: String,
    /// The locale the confirmation page is shown in.
    pub locale: Option<String>,
    /// When the token was minted (whole seconds).
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// The first instant the token is refused (whole seconds).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// What an itsdangerous token carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LegacyClaims {
    /// The signed JSON value (for links minted by a Flask app: the email).
    pub payload: Value,
    /// The payload when it is a JSON string, as the legacy pattern signs the email alone.
    pub email: Option<String>,
    /// When the token was signed.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
}

impl LegacyClaims {
    fn new(payload: Value, issued_at: OffsetDateTime) -> Self {
        let email = payload.as_str().map(str::to_owned);
        Self {
            payload,
            email,
            issued_at,
        }
    }
}

/// The PROOF's payload, serialized as `{"request_id":…,"user_id":…,"email":…,"purpose":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofPayload {
    /// The request's CloudEvent `id`, `null` when unknown (legacy tokens).
    pub request_id: Option<String>,
    /// The user, `null` when unknown (legacy tokens).
    pub user_id: Option<String>,
    /// The confirmed address.
    pub email: String,
    /// The purpose that was confirmed.
    pub purpose: String,
}

impl ProofPayload {
    /// Exactly Python's `json.dumps(dict, ensure_ascii=False, separators=(",", ":"))`
    /// of the dict in the contract's key order.
    fn to_python_json(&self) -> String {
        let mut out = String::with_capacity(96 + self.email.len());
        let opt = |value: &Option<String>, out: &mut String| match value {
            Some(s) => py_json_str(s, out),
            None => out.push_str("null"),
        };
        out.push_str("{\"request_id\":");
        opt(&self.request_id, &mut out);
        out.push_str(",\"user_id\":");
        opt(&self.user_id, &mut out);
        out.push_str(",\"email\":");
        py_json_str(&self.email, &mut out);
        out.push_str(",\"purpose\":");
        py_json_str(&self.purpose, &mut out);
        out.push('}');
        out
    }
}

/// Why a token was refused. Never carries secret material.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed token (see [`Malformation`]).
    #[error("malformed token: {0}")]
    Malformed(Malformation),
    /// Well-formed, but no configured key produced its signature.
    #[error("bad signature")]
    BadSignature,
    /// A `v1` token whose key id names none of the configured keys.
    #[error("signed with an unknown key")]
    UnknownKey,
    /// Authentic but expired; carries what was decoded.
    #[error("token expired")]
    Expired(Box<ExpiredToken>),
    /// Authentic, but minted for another purpose.
    #[error("token is for another purpose")]
    WrongPurpose,
}

impl From<Malformation> for TokenError {
    fn from(what: Malformation) -> Self {
        Self::Malformed(what)
    }
}

/// What an authentic but expired token contained.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpiredToken {
    /// A `v1` token's claims.
    V1(Claims),
    /// An itsdangerous token's payload (`None` if it does not decode) and signing time.
    Itsdangerous {
        /// The signed JSON value.
        payload: Option<Value>,
        /// When it was signed.
        issued_at: OffsetDateTime,
    },
}

/// Which part of a token is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformation {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    /// Not the expected dot-separated parts.
    #[error("not made of the expected parts")]
    Structure,
    /// The signature is not canonical base64url of the digest's length.
    #[error("signature is not canonical base64url of the right length")]
    Signature,
    /// The `v1` payload or the itsdangerous base64 does not decode.
    #[error("payload does not decode")]
    Payload,
    /// The timestamp does not decode or lies outside 1970..=9999.
    #[error("timestamp does not decode or is out of range")]
    Timestamp,
    /// The compressed payload is not a valid zlib stream.
    #[error("compressed payload is corrupt")]
    Compression,
    /// The compressed payload inflates beyond [`MAX_DECOMPRESSED_LEN`].
    #[error("payload inflates beyond {MAX_DECOMPRESSED_LEN} bytes")]
    TooLarge,
    /// The payload is not JSON.
    #[error("payload is not JSON")]
    Json,
    /// The JSON payload lacks the expected fields.
    #[error("payload lacks the expected fields")]
    Claims,
}

fn check_v1_expiry(claims: Claims, now: OffsetDateTime) -> Result<Claims, TokenError> {
    if now >= claims.expires_at {
        return Err(TokenError::Expired(Box::new(ExpiredToken::V1(claims))));
    }
    Ok(claims)
}

// ---------------------------------------------------------------------------
// Inspection
// ---------------------------------------------------------------------------

/// What `verimail token inspect` prints, as one JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspection {
    /// Whether the token holds now.
    pub status: InspectionStatus,
    /// The format recognised (absent when the input resembles neither).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<TokenFormat>,
    /// For itsdangerous tokens whose signature holds: the digest that signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The decoded payload, only when the signature holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// When the token was signed (RFC 3339, UTC).
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub issued_at: Option<OffsetDateTime>,
    /// When it stops being valid: `v1`'s own expiry, or itsdangerous' signing time + TTL.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// Why an invalid token was refused (a [`TokenError`] message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Inspection {
    fn invalid(format: Option<TokenFormat>, digest: Option<Digest>, error: &TokenError) -> Self {
        Self {
            status: InspectionStatus::Invalid,
            format,
            digest,
            payload: None,
            issued_at: None,
            expires_at: None,
            reason: Some(error.to_string()),
        }
    }
}

/// The verdict of [`Signer::inspect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InspectionStatus {
    /// Authentic and within its lifetime.
    Valid,
    /// Authentic but too old (or, for itsdangerous, stamped in the future).
    Expired,
    /// Malformed, tampered with, or signed by a key we do not have.
    Invalid,
}

// ---------------------------------------------------------------------------
// v1 payload codec
// ---------------------------------------------------------------------------

fn encode_claims(claims: &Claims) -> Vec<u8> {
    let strings = [
        Some(&claims.request_id),
        Some(&claims.user_id),
        Some(&claims.email),
        Some(&claims.purpose),
        claims.locale.as_ref(),
    ];
    let text: usize = strings.iter().flatten().map(|s| s.len() + 2).sum();
    let mut out = Vec::with_capacity(1 + 10 + 10 + text);
    out.push(if claims.locale.is_some() {
        V1_FLAG_LOCALE
    } else {
        0
    });
    let iat = claims.issued_at.unix_timestamp();
    let exp = claims.expires_at.unix_timestamp();
    put_varint(&mut out, zigzag(iat));
    // Both lie within OffsetDateTime's range (< 2^45 seconds): no overflow.
    put_varint(&mut out, zigzag(exp - iat));
    for s in strings.into_iter().flatten() {
        put_varint(&mut out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    out
}

fn decode_claims(bytes: &[u8]) -> Result<Claims, Malformation> {
    let mut r = Reader(bytes);
    let flags = r.byte().ok_or(Malformation::Payload)?;
    if flags & !V1_FLAG_LOCALE != 0 {
        return Err(Malformation::Payload);
    }
    let iat = unzigzag(r.varint().ok_or(Malformation::Payload)?);
    let lifetime = unzigzag(r.varint().ok_or(Malformation::Payload)?);
    let exp = iat.checked_add(lifetime).ok_or(Malformation::Timestamp)?;
    let request_id = r.string().ok_or(Malformation::Payload)?;
    let user_id = r.string().ok_or(Malformation::Payload)?;
    let email = r.string().ok_or(Malformation::Payload)?;
    let purpose = r.string().ok_or(Malformation::Payload)?;
    let locale = if flags & V1_FLAG_LOCALE != 0 {
        Some(r.string().ok_or(Malformation::Payload)?)
    } else {
        None
    };
    if !r.0.is_empty() {
        return Err(Malformation::Payload);
    }
    Ok(Claims {
        request_id,
        user_id,
        email,
        purpose,
        locale,
        issued_at: datetime(iat)?,
        expires_at: datetime(exp)?,
    })
}

/// A unix time in 1970..=9999 (what RFC 3339 output can express).
fn datetime(unix: i64) -> Result<OffsetDateTime, Malformation> {
    if !(0..=MAX_UNIX_SECONDS).contains(&unix) {
        return Err(Malformation::Timestamp);
    }
    OffsetDateTime::from_unix_timestamp(unix).map_err(|_| Malformation::Timestamp)
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    /// LEB128, at most 10 bytes, no bits beyond 64.
    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let low = u64::from(b & 0x7f);
            if shift == 63 && low > 1 {
                return None;
            }
            n |= low << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (text, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(text.to_vec()).ok()
    }
}

/// Canonical unpadded base64url of exactly `expected_chars` characters.
fn decode_signature(sig: &str, expected_chars: usize) -> Result<Vec<u8>, Malformation> {
    if sig.len() != expected_chars {
        return Err(Malformation::Signature);
    }
    // The engine refuses padding, junk and set trailing bits: only the canonical form passes.
    URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| Malformation::Signature)
}

// ---------------------------------------------------------------------------
// itsdangerous
// ---------------------------------------------------------------------------

/// An itsdangerous signing key: HMAC under `digest(salt + b"signer" + secret)`
/// (the default `django-concat` derivation).
#[derive(Clone)]
enum LegacyMac {
    Sha1(HmacSha1),
    Sha256(HmacSha256),
}

impl LegacyMac {
    fn derive(secret: &[u8], salt: &[u8], digest: Digest) -> Self {
        match digest {
            Digest::Sha1 => {
                let key = Sha1::new()
                    .chain_update(salt)
                    .chain_update(b"signer")
                    .chain_update(secret)
                    .finalize();
                Self::Sha1(keyed_mac(&key))
            }
            Digest::Sha256 => {
                let key = Sha256::new()
                    .chain_update(salt)
                    .chain_update(b"signer")
                    .chain_update(secret)
                    .finalize();
                Self::Sha256(keyed_mac(&key))
            }
        }
    }

    /// Length of the base64url signature this digest produces.
    fn sig_chars(&self) -> usize {
        match self {
            Self::Sha1(_) => 27,
            Self::Sha256(_) => 43,
        }
    }

    fn sign_into(&self, msg: &[u8], out: &mut String) {
        match self {
            Self::Sha1(mac) => {
                let mut mac = mac.clone();
                mac.update(msg);
                URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), out);
            }
            Self::Sha256(mac) => {
                let mut mac = mac.clone();
                mac.update(msg);
                URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), out);
            }
        }
    }

    /// Constant-time comparison (`verify_slice` also checks the length).
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            Self::Sha1(mac) => {
                let mut mac = mac.clone();
                mac.update(msg);
                mac.verify_slice(sig).is_ok()
            }
            Self::Sha256(mac) => {
                let mut mac = mac.clone();
                mac.update(msg);
                mac.verify_slice(sig).is_ok()
            }
        }
    }
}

/// `URLSafeSerializerMixin.dump_payload` + `TimestampSigner.sign`, with `macs[0]`.
fn dumps_json(macs: &[LegacyMac], json: &[u8], now: OffsetDateTime) -> String {
    let Some(mac) = macs.first() else {
        return String::new();
    };
    let compressed = zlib_compress(json);
    // itsdangerous compresses only when that saves at least two bytes.
    let packed = compressed.filter(|c| c.len() + 1 < json.len());
    let body = packed.as_deref().unwrap_or(json);
    let mut token = String::with_capacity(1 + body.len().div_ceil(3) * 4 + 1 + 11 + 1 + 43);
    if packed.is_some() {
        token.push('.');
    }
    URL_SAFE_NO_PAD.encode_string(body, &mut token);
    token.push('.');
    // Python's int(time.time()); a clock before 1970 (which Python cannot sign) stamps 0.
    let ts = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let ts_bytes = ts.to_be_bytes();
    let first = ts_bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(ts_bytes.len());
    URL_SAFE_NO_PAD.encode_string(&ts_bytes[first..], &mut token);
    let signed_len = token.len();
    token.push('.');
    let mut sig = String::with_capacity(mac.sig_chars());
    mac.sign_into(&token.as_bytes()[..signed_len], &mut sig);
    token.push_str(&sig);
    token
}

/// `Signer.unsign`: returns the signed value (`payload.timestamp`) when some key signed it.
fn unsign<'t>(macs: &[LegacyMac], token: &'t str) -> Result<&'t str, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Malformation::TooLong.into());
    }
    let (value, sig) = token.rsplit_once('.').ok_or(Malformation::Structure)?;
    let Some(first) = macs.first() else {
        return Err(TokenError::BadSignature);
    };
    let sig = decode_signature(sig, first.sig_chars())?;
    // Like itsdangerous, every key is tried; each comparison is constant-time.
    if macs.iter().any(|mac| mac.verify(value.as_bytes(), &sig)) {
        Ok(value)
    } else {
        Err(TokenError::BadSignature)
    }
}

/// The rest of `TimestampSigner.unsign` and `load_payload`, once the signature holds.
fn open_legacy(
    value: &str,
    max_age_seconds: u64,
    now: OffsetDateTime,
) -> Result<(Value, OffsetDateTime), TokenError> {
    let (payload, ts) = value.rsplit_once('.').ok_or(Malformation::Timestamp)?;
    let issued_at = decode_timestamp(ts)?;
    let age = i128::from(now.unix_timestamp()) - i128::from(issued_at.unix_timestamp());
    // itsdangerous: expired when older than max_age, and when stamped in the future.
    if age > i128::from(max_age_seconds) || age < 0 {
        return Err(TokenError::Expired(Box::new(ExpiredToken::Itsdangerous {
            payload: decode_payload(payload).ok(),
            issued_at,
        })));
    }
    Ok((decode_payload(payload)?, issued_at))
}

/// Big-endian unsigned integer of at most 8 bytes (minimal, or with leading zeros).
fn decode_timestamp(ts: &str) -> Result<OffsetDateTime, Malformation> {
    if ts.len() > 11 {
        return Err(Malformation::Timestamp);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(ts)
        .map_err(|_| Malformation::Timestamp)?;
    if bytes.len() > 8 {
        return Err(Malformation::Timestamp);
    }
    let n = bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
    datetime(i64::try_from(n).map_err(|_| Malformation::Timestamp)?)
}

fn decode_payload(payload: &str) -> Result<Value, Malformation> {
    let (compressed, b64) = match payload.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, payload),
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| Malformation::Payload)?;
    let json = if compressed {
        zlib_decompress(&bytes)?
    } else {
        bytes
    };
    serde_json::from_slice(&json).map_err(|_| Malformation::Json)
}

/// `zlib.compress(data)`: a zlib stream at level 6. `None` only if zlib failed.
fn zlib_compress(data: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        // A deflate state is about 270 KiB that zlib allocates and clears: setting one
        // up costs ~60 µs, resetting one ~3 µs. Reset output is identical to fresh output.
        static DEFLATER: RefCell<Option<Compress>> = const { RefCell::new(None) };
    }
    let compress = |deflater: &mut Compress| -> Option<Vec<u8>> {
        // Enough for incompressible input (deflateBound) in one call.
        let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 64);
        loop {
            let consumed = usize::try_from(deflater.total_in()).ok()?;
            let status = deflater
                .compress_vec(data.get(consumed..)?, &mut out, FlushCompress::Finish)
                .ok()?;
            match status {
                Status::StreamEnd => return Some(out),
                Status::Ok | Status::BufError => out.reserve(out.capacity().max(64)),
            }
        }
    };
    let fresh = || Compress::new(Compression::new(ZLIB_LEVEL), true);
    DEFLATER
        .try_with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            let deflater = slot.get_or_insert_with(fresh);
            deflater.reset();
            compress(deflater)
        })
        // Thread-local storage is gone only while the thread exits.
        .unwrap_or_else(|_| compress(&mut fresh()))
}

/// `zlib.decompress(data)` that stops at [`MAX_DECOMPRESSED_LEN`] bytes of output.
///
/// Like Python, bytes after the end of the stream are ignored and a truncated stream
/// is an error.
fn zlib_decompress(data: &[u8]) -> Result<Vec<u8>, Malformation> {
    let mut inflater = Decompress::new(true);
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).clamp(64, MAX_DECOMPRESSED_LEN));
    loop {
        if out.len() > MAX_DECOMPRESSED_LEN {
            return Err(Malformation::TooLarge);
        }
        if out.len() == out.capacity() {
            // Never more than one byte past the cap: that byte proves the overflow.
            let room = out.capacity().min(MAX_DECOMPRESSED_LEN + 1 - out.len());
            out.reserve_exact(room);
        }
        let before = (inflater.total_in(), inflater.total_out());
        let consumed = usize::try_from(before.0).map_err(|_| Malformation::Compression)?;
        let input = data.get(consumed..).ok_or(Malformation::Compression)?;
        let status = inflater
            // `None`, not `Finish`: miniz refuses `Finish` when the output has no room
            // for everything, and this loop feeds the output in slices.
            .decompress_vec(input, &mut out, FlushDecompress::None)
            .map_err(|_| Malformation::Compression)?;
        if out.len() > MAX_DECOMPRESSED_LEN {
            return Err(Malformation::TooLarge);
        }
        match status {
            Status::StreamEnd => return Ok(out),
            Status::Ok | Status::BufError => {
                let stalled = (inflater.total_in(), inflater.total_out()) == before;
                if stalled && out.len() < out.capacity() {
                    // Room to write and nothing left to read: the stream is truncated.
                    return Err(Malformation::Compression);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Python-compatible JSON
// ---------------------------------------------------------------------------

/// `json.dumps(value, ensure_ascii=False, separators=(",", ":"))`.
fn py_json(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(f) = n.as_f64() {
                py_float_repr(f, out);
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => py_json_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                py_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                py_json_str(key, out);
                out.push(':');
                py_json(item, out);
            }
            out.push('}');
        }
    }
}

/// Python's string escaping with `ensure_ascii=False`: `"` `\` and C0 controls only
/// (`\b \f \n \r \t` by name, the rest as lowercase `\u00XX`); DEL, U+2028 and `/` stay.
fn py_json_str(s: &str, out: &mut String) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-tripping digits, in positional notation
/// when the decimal exponent is in -4..16, otherwise as `d.ddde+XX`.
fn py_float_repr(f: f64, out: &mut String) {
    if !f.is_finite() {
        // Python writes these (invalid JSON); a serde_json Value never holds them.
        out.push_str(if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
        return;
    }
    // Rust's `{:e}` is also the shortest round-tripping form: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    let ndigits = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    // Position of the decimal point relative to the digits, as in Python's dtoa.
    let decpt = exp + 1;
    if negative {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", e.unsigned_abs()));
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', decpt.unsigned_abs() as usize));
        out.push_str(&digits);
    } else if decpt >= ndigits {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (decpt - ndigits) as usize));
        out.push_str(".0");
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn signer(secret: &str, old: &[&str], salt: &str, digest: Digest) -> Signer {
        let keys = Keys::new(
            SecretString::from(secret),
            old.iter().map(|&s| SecretString::from(s)).collect(),
            salt.to_owned(),
        );
        Signer::new(&keys, digest)
    }

    fn claims() -> Claims {
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

    #[test]
    fn varints_round_trip_at_every_width() {
        for n in [0, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, n);
            let mut r = Reader(&buf);
            assert_eq!(r.varint(), Some(n));
            assert!(r.0.is_empty());
        }
    }

    #[test]
    fn a_varint_longer_than_64_bits_is_refused() {
        let mut r = Reader(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert_eq!(r.varint(), None);
        let mut r = Reader(&[0x80; 11]);
        assert_eq!(r.varint(), None);
    }

    #[test]
    fn zigzag_round_trips_signed_numbers() {
        for n in [0, -1, 1, i64::MIN, i64::MAX, -3600, 1_764_000_000] {
            assert_eq!(unzigzag(zigzag(n)), n);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn claims_survive_the_binary_codec() {
        let c = claims();
        assert_eq!(decode_claims(&encode_claims(&c)), Ok(c.clone()));
        let no_locale = Claims { locale: None, ..c };
        assert_eq!(decode_claims(&encode_claims(&no_locale)), Ok(no_locale));
    }

    #[test]
    fn payloads_with_trailing_bytes_or_unknown_flags_are_malformed() {
        let mut bytes = encode_claims(&claims());
        bytes.push(0);
        assert_eq!(decode_claims(&bytes), Err(Malformation::Payload));
        let mut bytes = encode_claims(&claims());
        bytes[0] |= 0x80;
        assert_eq!(decode_claims(&bytes), Err(Malformation::Payload));
        assert_eq!(decode_claims(&[]), Err(Malformation::Payload));
    }

    #[test]
    fn timestamps_outside_rfc3339_years_are_malformed() {
        let c = Claims {
            issued_at: datetime!(1969-12-31 23:59:59 UTC),
            ..claims()
        };
        assert_eq!(
            decode_claims(&encode_claims(&c)),
            Err(Malformation::Timestamp)
        );
    }

    #[test]
    fn python_string_escapes_match_json_dumps() {
        let mut out = String::new();
        py_json_str(
            "a\"b\\c\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}\u{2028}/é用😀",
            &mut out,
        );
        assert_eq!(
            out,
            "\"a\\\"b\\\\c\\n\\r\\t\\b\\f\\u0000\\u001f\u{7f}\u{2028}/é用😀\""
        );
    }

    #[test]
    fn python_float_repr_matches_cpython() {
        // Expected strings from CPython 3.11's repr().
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (1e300, "1e+300"),
            (-1.25e-300, "-1.25e-300"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (123.456, "123.456"),
            (0.000123, "0.000123"),
        ];
        for &(f, expected) in cases {
            let mut out = String::new();
            py_float_repr(f, &mut out);
            assert_eq!(out, expected, "repr({f:?})");
        }
    }

    #[test]
    fn python_json_writes_compact_values() {
        let value = serde_json::json!({"a": [1, -2, 2.5, null, true, false], "b": {"c": "x"}, "d": u64::MAX});
        let mut out = String::new();
        py_json(&value, &mut out);
        assert_eq!(
            out,
            r#"{"a":[1,-2,2.5,null,true,false],"b":{"c":"x"},"d":18446744073709551615}"#
        );
    }

    #[test]
    fn the_proof_payload_keeps_the_contract_key_order() {
        let proof = ProofPayload {
            request_id: None,
            user_id: Some("42".into()),
            email: "a@b.c".into(),
            purpose: "reset_password".into(),
        };
        assert_eq!(
            proof.to_python_json(),
            r#"{"request_id":null,"user_id":"42","email":"a@b.c","purpose":"reset_password"}"#
        );
    }

    #[test]
    fn compression_round_trips() {
        let data = b"\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@example.com\"";
        let packed = zlib_compress(data).expect("zlib compresses");
        assert!(packed.len() < data.len());
        assert_eq!(zlib_decompress(&packed).as_deref(), Ok(&data[..]));
    }

    #[test]
    fn compression_is_byte_identical_to_cpython_zlib() {
        // zlib.compress(b'"' + b"a" * 60 + b'@example.com"').hex() in CPython.
        let data = format!("\"{}@example.com\"", "a".repeat(60));
        let expected = "789c534aa40038a45624e616e4a4ea25e7e72a0100099c1b9a";
        let packed = zlib_compress(data.as_bytes()).expect("zlib compresses");
        let hex: String = packed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex, expected,
            "itsdangerous tokens need the reference C zlib: enable flate2's `zlib` feature"
        );
    }

    #[test]
    fn a_zip_bomb_stops_at_the_cap() {
        let bomb = zlib_compress(&vec![b' '; 8 * MAX_DECOMPRESSED_LEN]).expect("zlib compresses");
        assert_eq!(zlib_decompress(&bomb), Err(Malformation::TooLarge));
        let exact = zlib_compress(&vec![b' '; MAX_DECOMPRESSED_LEN]).expect("zlib compresses");
        assert_eq!(
            zlib_decompress(&exact).map(|v| v.len()),
            Ok(MAX_DECOMPRESSED_LEN)
        );
    }

    #[test]
    fn a_truncated_or_corrupt_stream_is_refused_and_trailing_bytes_ignored() {
        let packed = zlib_compress(b"\"hello hello hello hello\"").expect("zlib compresses");
        assert_eq!(
            zlib_decompress(&packed[..packed.len() - 1]),
            Err(Malformation::Compression)
        );
        assert_eq!(zlib_decompress(b"nonsense"), Err(Malformation::Compression));
        assert_eq!(zlib_decompress(&[]), Err(Malformation::Compression));
        let mut trailing = packed.clone();
        trailing.extend_from_slice(b"junk");
        assert!(zlib_decompress(&trailing).is_ok());
    }

    #[test]
    fn a_signed_zip_bomb_is_malformed_not_inflated() {
        // 1 MiB of spaces compresses to about 1 KiB: small enough to fit in a token.
        let s = signer("k", &[], "email-confirm", Digest::Sha1);
        let bomb = zlib_compress(&vec![b' '; 1 << 20]).expect("zlib compresses");
        let mut token = String::from(".");
        URL_SAFE_NO_PAD.encode_string(&bomb, &mut token);
        token.push_str(".aSSBAA");
        let value = token.clone();
        token.push('.');
        s.legacy_macs(Digest::Sha1)[0].sign_into(value.as_bytes(), &mut token);
        assert!(token.len() <= MAX_TOKEN_LEN);
        let now = datetime!(2025-11-24 16:00:00 UTC);
        assert_eq!(
            s.verify_itsdangerous(&token, 60, now),
            Err(TokenError::Malformed(Malformation::TooLarge))
        );
    }

    #[test]
    fn timestamps_are_minimal_big_endian_bytes() {
        assert_eq!(
            decode_timestamp("aSSBAA").map(|t| t.unix_timestamp()),
            Ok(1_764_000_000)
        );
        assert_eq!(decode_timestamp("").map(|t| t.unix_timestamp()), Ok(0));
        assert_eq!(
            decode_timestamp("AAAAAAAAAAAA"),
            Err(Malformation::Timestamp)
        );
        // 2^63: beyond i64 and year 9999.
        assert_eq!(
            decode_timestamp("gAAAAAAAAAA"),
            Err(Malformation::Timestamp)
        );
    }

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
    fn inspect_says_why_a_token_of_the_other_digest_fails() {
        let now = datetime!(2025-11-24 16:00:00 UTC);
        let token = signer("k", &[], "s", Digest::Sha256).mint_itsdangerous("a@b.c", now);
        let other_key = signer("other", &[], "s", Digest::Sha1);
        let inspection = other_key.inspect(&token, 60, now);
        assert_eq!(inspection.status, InspectionStatus::Invalid);
        assert_eq!(inspection.format, Some(TokenFormat::Itsdangerous));
        assert_eq!(inspection.reason.as_deref(), Some("bad signature"));
    }

    #[test]
    fn inspect_serialises_as_the_contract_says() {
        let now = datetime!(2025-11-24 16:00:00 UTC);
        let s = signer("k", &[], "email-confirm", Digest::Sha1);
        let token = s.mint_itsdangerous("a@b.c", now);
        let json = serde_json::to_value(s.inspect(&token, 3600, now)).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "status": "valid",
                "format": "itsdangerous",
                "digest": "sha1",
                "payload": "a@b.c",
                "issued_at": "2025-11-24T16:00:00Z",
                "expires_at": "2025-11-24T17:00:00Z",
            })
        );
        let json = serde_json::to_value(s.inspect("nonsense", 3600, now)).expect("serialises");
        assert_eq!(json["status"], "invalid");
        assert!(json.get("payload").is_none());
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

    #[test]
    fn looks_like_v1_wants_the_prefix_and_four_parts() {
        let s = signer("k", &[], "s", Digest::Sha1);
        assert!(looks_like_v1(&s.mint_v1(&claims())));
        assert!(!looks_like_v1("v1.a.b"));
        assert!(!looks_like_v1(
            "ImFAYi5jIg.aSSBAA.cIL0gKQnyhZASOtUkqk1fXm9Usg"
        ));
        assert!(looks_like_itsdangerous(
            "ImFAYi5jIg.aSSBAA.cIL0gKQnyhZASOtUkqk1fXm9Usg"
        ));
        assert!(looks_like_itsdangerous(".eJx.aSSBAA.cIL0"));
        assert!(!looks_like_itsdangerous("hello world"));
    }

    #[test]
    fn names_parse_and_display_as_configured() {
        assert_eq!("v1".parse(), Ok(TokenFormat::V1));
        assert_eq!("itsdangerous".parse(), Ok(TokenFormat::Itsdangerous));
        assert_eq!(TokenFormat::Itsdangerous.to_string(), "itsdangerous");
        assert_eq!("sha256".parse(), Ok(Digest::Sha256));
        assert_eq!(Digest::Sha1.to_string(), "sha1");
        let err = "SHA1".parse::<Digest>().expect_err("case matters");
        assert_eq!(
            err.to_string(),
            "unknown digest, expected `sha1` or `sha256`"
        );
        assert_eq!(
            serde_json::to_string(&TokenFormat::Itsdangerous)
                .ok()
                .as_deref(),
            Some("\"itsdangerous\"")
        );
    }
}
