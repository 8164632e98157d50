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

mod api_key;
mod claims;
mod code;
mod inspect;
mod itsdangerous;
mod names;
mod pyjson;
mod signer;
mod v1;

#[cfg(test)]
mod fixtures;

pub use api_key::ApiKeys;
pub use claims::{Claims, ExpiredToken, LegacyClaims, Malformation, ProofPayload, TokenError};
pub use code::{Code, well_formed as code_well_formed};
pub use inspect::{Inspection, InspectionStatus, inspect, looks_like_v1};
pub use names::{Digest, ParseNameError, TokenFormat};
pub use signer::{Keys, Signer};

use hmac::Hmac;
use sha1::Sha1;
use sha2::Sha256;

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
