//! itsdangerous compatibility: key derivation, `dumps` and `loads` of
//! `URLSafeTimedSerializer` (timestamp, signature, payload), and the zlib
//! compression CPython applies, bounded on the way in.

use std::cell::RefCell;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use hmac::Mac;
use serde_json::Value;
use sha1::Sha1;
use sha2::Digest as _;
use sha2::Sha256;
use time::OffsetDateTime;

use super::claims::{ExpiredToken, Malformation, TokenError};
use super::names::Digest;
use super::signer::keyed_mac;
use super::v1::{datetime, decode_signature};
use super::{HmacSha1, HmacSha256, MAX_DECOMPRESSED_LEN, MAX_TOKEN_LEN, ZLIB_LEVEL};

/// An itsdangerous signing key: HMAC under `digest(salt + b"signer" + secret)`
/// (the default `django-concat` derivation).
#[derive(Clone)]
pub(super) enum LegacyMac {
    Sha1(HmacSha1),
    Sha256(HmacSha256),
}

impl LegacyMac {
    pub(super) fn derive(secret: &[u8], salt: &[u8], digest: Digest) -> Self {
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

    pub(super) fn sign_into(&self, msg: &[u8], out: &mut String) {
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
pub(super) fn dumps_json(macs: &[LegacyMac], json: &[u8], now: OffsetDateTime) -> String {
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
pub(super) fn unsign<'t>(macs: &[LegacyMac], token: &'t str) -> Result<&'t str, TokenError> {
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
pub(super) fn open_legacy(
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
        // A deflate state is a large buffer that zlib allocates and clears: setting one
        // up costs far more than resetting one, and reset output is identical to fresh output.
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::fixtures::signer;
    use time::macros::datetime;

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
}
