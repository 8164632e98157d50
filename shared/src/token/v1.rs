//! The `v1` payload codec: claims as a compact binary record (flags, zigzag
//! LEB128 varints, length-prefixed UTF-8), and the canonical base64url check of a
//! signature. The layout is described in the module documentation of `token`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use time::OffsetDateTime;

use super::claims::{Claims, Malformation};
use super::{MAX_UNIX_SECONDS, V1_FLAG_LOCALE};

pub(super) fn encode_claims(claims: &Claims) -> Vec<u8> {
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

pub(super) fn decode_claims(bytes: &[u8]) -> Result<Claims, Malformation> {
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
pub(super) fn datetime(unix: i64) -> Result<OffsetDateTime, Malformation> {
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
pub(super) fn decode_signature(sig: &str, expected_chars: usize) -> Result<Vec<u8>, Malformation> {
    if sig.len() != expected_chars {
        return Err(Malformation::Signature);
    }
    // The engine refuses padding, junk and set trailing bits: only the canonical form passes.
    URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| Malformation::Signature)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::fixtures::claims;
    use time::macros::datetime;

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
}
