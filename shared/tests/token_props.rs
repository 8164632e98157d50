//! Properties of the token formats: round trips, tamper evidence, key rotation, expiry,
//! and no panic on any input.

use proptest::prelude::*;
use secrecy::SecretString;
use serde_json::Value;
use time::OffsetDateTime;
use verimail_shared::token::{
    Claims, Digest, ExpiredToken, InspectionStatus, Keys, ProofPayload, Signer, TokenError,
    TokenFormat, inspect, looks_like_v1,
};

const SALT: &str = "email-confirm";

fn signer_with(current: &str, old: &[&str], salt: &str, digest: Digest) -> Signer {
    let keys = Keys::new(
        SecretString::from(current),
        old.iter().map(|&s| SecretString::from(s)).collect(),
        salt.to_owned(),
    );
    Signer::new(&keys, digest)
}

fn signer(digest: Digest) -> Signer {
    signer_with("current secret", &[], SALT, digest)
}

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).expect("test timestamps are in range")
}

/// Any characters, controls and astral planes included.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(|chars| chars.into_iter().collect())
}

/// Emails, including repetitive ones that itsdangerous compresses.
fn email() -> impl Strategy<Value = String> {
    prop_oneof![
        text(60),
        (text(6), 1..40usize, text(12)).prop_map(|(unit, n, tail)| unit.repeat(n) + &tail),
        Just("用户@例子.公司".to_owned()),
        Just("josé@example.com".to_owned()),
    ]
}

/// Unix seconds between 1970 and 2200.
fn unix() -> impl Strategy<Value = i64> {
    0i64..7_258_118_400
}

fn claims() -> impl Strategy<Value = Claims> {
    (
        text(40),
        text(20),
        email(),
        prop_oneof![
            Just("verify_email".to_owned()),
            Just("reset_password".to_owned()),
            text(16)
        ],
        prop::option::of(text(12)),
        unix(),
        1i64..10_000_000,
    )
        .prop_map(
            |(request_id, user_id, email, purpose, locale, iat, lifetime)| Claims {
                request_id,
                user_id,
                email,
                purpose,
                locale,
                issued_at: at(iat),
                expires_at: at(iat + lifetime),
            },
        )
}

/// Characters a tamperer might put in: the token alphabet and a few outsiders.
fn replacement() -> impl Strategy<Value = char> {
    prop_oneof![
        prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ é"
                .chars()
                .collect::<Vec<_>>()
        ),
        any::<char>(),
    ]
}

/// Replaces the character at `index` (modulo the length) by `c`, when they differ.
fn replace_char(token: &str, index: usize, c: char) -> Option<String> {
    let chars: Vec<char> = token.chars().collect();
    let i = index % chars.len();
    if chars[i] == c {
        return None;
    }
    let mut out: String = chars[..i].iter().collect();
    out.push(c);
    out.extend(&chars[i + 1..]);
    Some(out)
}

/// A refusal that does not vouch for authenticity (expired and wrong-purpose do).
fn is_forgery_refusal<T: std::fmt::Debug>(result: &Result<T, TokenError>) -> bool {
    matches!(
        result,
        Err(TokenError::Malformed(_) | TokenError::BadSignature | TokenError::UnknownKey)
    )
}

fn url_safe(token: &str) -> bool {
    token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    // ----- v1 -----

    #[test]
    fn every_v1_token_round_trips(c in claims()) {
        let s = signer(Digest::Sha1);
        let token = s.mint_v1(&c);
        prop_assert_eq!(s.verify_v1(&token, c.issued_at), Ok(c.clone()));
        prop_assert_eq!(s.verify_v1_for(&token, &c.purpose, c.issued_at), Ok(c));
    }

    #[test]
    fn v1_tokens_are_url_safe_and_recognisable(c in claims()) {
        let token = signer(Digest::Sha1).mint_v1(&c);
        prop_assert!(url_safe(&token), "{}", token);
        prop_assert!(looks_like_v1(&token));
        prop_assert!(token.starts_with("v1."));
    }

    #[test]
    fn changing_any_character_of_a_v1_token_breaks_it(
        c in claims(), index in any::<usize>(), with in replacement(),
    ) {
        let s = signer(Digest::Sha1);
        let token = s.mint_v1(&c);
        if let Some(forged) = replace_char(&token, index, with) {
            let result = s.verify_v1(&forged, c.issued_at);
            prop_assert!(is_forgery_refusal(&result), "{} -> {:?}", forged, result);
        }
    }

    #[test]
    fn truncating_a_v1_token_breaks_it(c in claims(), cut in any::<usize>()) {
        let s = signer(Digest::Sha1);
        let token = s.mint_v1(&c);
        let forged = &token[..cut % token.len()];
        prop_assert!(is_forgery_refusal(&s.verify_v1(forged, c.issued_at)));
    }

    #[test]
    fn another_secret_or_salt_refuses_a_v1_token(c in claims()) {
        let token = signer(Digest::Sha1).mint_v1(&c);
        let other_secret = signer_with("another secret", &[], SALT, Digest::Sha1);
        let other_salt = signer_with("current secret", &[], "other-salt", Digest::Sha1);
        prop_assert_eq!(other_secret.verify_v1(&token, c.issued_at), Err(TokenError::UnknownKey));
        prop_assert_eq!(other_salt.verify_v1(&token, c.issued_at), Err(TokenError::UnknownKey));
    }

    #[test]
    fn another_purpose_refuses_a_v1_token(c in claims(), purpose in text(16)) {
        prop_assume!(purpose != c.purpose);
        let s = signer(Digest::Sha1);
        let token = s.mint_v1(&c);
        prop_assert_eq!(s.verify_v1_for(&token, &purpose, c.issued_at), Err(TokenError::WrongPurpose));
    }

    #[test]
    fn a_v1_token_signed_with_a_retired_key_still_verifies(c in claims()) {
        let before = signer_with("old secret", &[], SALT, Digest::Sha1);
        let rotated = signer_with("new secret", &["old secret"], SALT, Digest::Sha1);
        let retired = signer_with("new secret", &[], SALT, Digest::Sha1);
        let token = before.mint_v1(&c);
        prop_assert_eq!(rotated.verify_v1(&token, c.issued_at), Ok(c.clone()));
        prop_assert_eq!(retired.verify_v1(&token, c.issued_at), Err(TokenError::UnknownKey));
        // New tokens carry the new key id.
        prop_assert!(rotated.mint_v1(&c).contains(rotated.current_kid()));
        prop_assert_ne!(rotated.current_kid(), before.current_kid());
    }

    #[test]
    fn a_v1_token_expires_exactly_at_expires_at(c in claims(), late in 0i64..1_000_000) {
        let s = signer(Digest::Sha1);
        let token = s.mint_v1(&c);
        let last_second = c.expires_at - time::Duration::seconds(1);
        prop_assert_eq!(s.verify_v1(&token, last_second), Ok(c.clone()));
        let expired = s.verify_v1(&token, c.expires_at + time::Duration::seconds(late));
        prop_assert_eq!(expired, Err(TokenError::Expired(Box::new(ExpiredToken::V1(c)))));
    }

    #[test]
    fn inspect_reports_v1_tokens(c in claims()) {
        let s = signer(Digest::Sha1);
        let token = s.mint_v1(&c);
        let valid = inspect(&s, &token, 3600, c.issued_at);
        prop_assert_eq!(valid.status, InspectionStatus::Valid);
        prop_assert_eq!(valid.format, Some(TokenFormat::V1));
        prop_assert_eq!(valid.issued_at, Some(c.issued_at));
        prop_assert_eq!(valid.expires_at, Some(c.expires_at));
        let payload = valid.payload.expect("a payload when the signature holds");
        prop_assert_eq!(&payload["email"], &Value::from(c.email.as_str()));
        let expired = inspect(&s, &token, 3600, c.expires_at);
        prop_assert_eq!(expired.status, InspectionStatus::Expired);
        prop_assert!(expired.payload.is_some());
        let forged = format!("{}x", token);
        let invalid = inspect(&s, &forged, 3600, c.issued_at);
        prop_assert_eq!(invalid.status, InspectionStatus::Invalid);
        prop_assert!(invalid.payload.is_none());
    }

    // ----- itsdangerous -----

    #[test]
    fn every_itsdangerous_token_round_trips(
        e in email(), now in unix(), sha256 in any::<bool>(),
    ) {
        let digest = if sha256 { Digest::Sha256 } else { Digest::Sha1 };
        let s = signer(digest);
        let token = s.mint_itsdangerous(&e, at(now));
        prop_assert!(url_safe(&token), "{}", token);
        prop_assert!(!looks_like_v1(&token));
        let claims = s.verify_itsdangerous(&token, 0, at(now)).expect("a fresh token verifies");
        prop_assert_eq!(claims.email.as_deref(), Some(e.as_str()));
        prop_assert_eq!(claims.payload, Value::from(e));
        prop_assert_eq!(claims.issued_at, at(now));
    }

    #[test]
    fn changing_any_character_of_an_itsdangerous_token_breaks_it(
        e in email(), index in any::<usize>(), with in replacement(), sha256 in any::<bool>(),
    ) {
        let digest = if sha256 { Digest::Sha256 } else { Digest::Sha1 };
        let s = signer(digest);
        let now = at(1_764_000_000);
        let token = s.mint_itsdangerous(&e, now);
        if let Some(forged) = replace_char(&token, index, with) {
            let result = s.verify_itsdangerous(&forged, 3600, now);
            prop_assert!(is_forgery_refusal(&result), "{} -> {:?}", forged, result);
        }
    }

    #[test]
    fn truncating_an_itsdangerous_token_breaks_it(e in email(), cut in any::<usize>()) {
        let s = signer(Digest::Sha1);
        let now = at(1_764_000_000);
        let token = s.mint_itsdangerous(&e, now);
        let forged = &token[..cut % token.len()];
        prop_assert!(is_forgery_refusal(&s.verify_itsdangerous(forged, 3600, now)));
    }

    #[test]
    fn another_secret_salt_or_digest_refuses_an_itsdangerous_token(e in email()) {
        let now = at(1_764_000_000);
        let token = signer(Digest::Sha1).mint_itsdangerous(&e, now);
        for other in [
            signer_with("another secret", &[], SALT, Digest::Sha1),
            signer_with("current secret", &[], "other-salt", Digest::Sha1),
            signer(Digest::Sha256),
        ] {
            prop_assert!(is_forgery_refusal(&other.verify_itsdangerous(&token, 3600, now)));
        }
    }

    #[test]
    fn an_itsdangerous_token_signed_with_a_retired_key_still_verifies(e in email()) {
        let now = at(1_764_000_000);
        let token = signer_with("old secret", &[], SALT, Digest::Sha1).mint_itsdangerous(&e, now);
        let rotated = signer_with("new secret", &["old secret"], SALT, Digest::Sha1);
        let retired = signer_with("new secret", &[], SALT, Digest::Sha1);
        prop_assert!(rotated.verify_itsdangerous(&token, 3600, now).is_ok());
        prop_assert_eq!(retired.verify_itsdangerous(&token, 3600, now), Err(TokenError::BadSignature));
        // Minting always uses the current key.
        let fresh = rotated.mint_itsdangerous(&e, now);
        prop_assert!(retired.verify_itsdangerous(&fresh, 3600, now).is_ok());
    }

    #[test]
    fn an_itsdangerous_token_expires_after_max_age_and_before_it_was_signed(
        e in email(), max_age in 0u64..1_000_000, late in 1i64..1_000_000,
    ) {
        let s = signer(Digest::Sha256);
        let signed = 1_764_000_000i64;
        let token = s.mint_itsdangerous(&e, at(signed));
        let max = i64::try_from(max_age).expect("small");
        prop_assert!(s.verify_itsdangerous(&token, max_age, at(signed + max)).is_ok());
        for now in [signed + max + late, signed - late] {
            match s.verify_itsdangerous(&token, max_age, at(now)) {
                Err(TokenError::Expired(expired)) => {
                    let ExpiredToken::Itsdangerous { payload, issued_at } = *expired else {
                        return Err(TestCaseError::fail("an itsdangerous expiry"));
                    };
                    prop_assert_eq!(payload, Some(Value::from(e.clone())));
                    prop_assert_eq!(issued_at, at(signed));
                }
                other => return Err(TestCaseError::fail(format!("expected expiry, got {other:?}"))),
            }
        }
    }

    #[test]
    fn json_values_round_trip_through_the_generic_helpers(value in json(), sha256 in any::<bool>()) {
        let digest = if sha256 { Digest::Sha256 } else { Digest::Sha1 };
        let s = signer(Digest::Sha1);
        let now = at(1_764_000_000);
        let token = s.dumps_itsdangerous_with(&value, "any salt", digest, now);
        prop_assert_eq!(s.loads_itsdangerous_with(&token, "any salt", digest, 10, now), Ok((value, now)));
        prop_assert!(is_forgery_refusal(&s.loads_itsdangerous_with(&token, "other salt", digest, 10, now)));
    }

    #[test]
    fn proofs_round_trip(
        request_id in prop::option::of(text(40)), user_id in prop::option::of(text(20)),
        email in email(), purpose in text(16),
    ) {
        let s = signer(Digest::Sha1);
        let proof = ProofPayload { request_id, user_id, email, purpose };
        let now = at(1_764_000_000);
        let token = s.mint_proof(&proof, now);
        prop_assert!(url_safe(&token));
        prop_assert_eq!(s.verify_proof(&token, now), Ok(proof));
        // A proof is no link: the link verifier refuses it, and vice versa.
        prop_assert!(is_forgery_refusal(&s.verify_itsdangerous(&token, 900, now)));
    }

    // ----- no input panics -----

    #[test]
    fn arbitrary_input_never_panics(input in junk()) {
        let now = at(1_764_000_000);
        for s in [signer(Digest::Sha1), signer(Digest::Sha256)] {
            let _ = s.verify_v1(&input, now);
            let _ = s.verify_v1_for(&input, "verify_email", now);
            let _ = s.verify_itsdangerous(&input, 3600, now);
            let _ = s.verify_itsdangerous(&input, u64::MAX, now);
            let _ = s.verify_proof(&input, now);
            let _ = s.loads_itsdangerous_with(&input, "x", Digest::Sha256, 0, now);
            let inspection = s.inspect(&input, u64::MAX, now);
            prop_assert!(serde_json::to_string(&inspection).is_ok());
            let _ = looks_like_v1(&input);
        }
    }
}

/// Arbitrary strings, and strings shaped like tokens that get past the first checks.
fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        text(200),
        any::<String>(),
        "v1\\.[A-Za-z0-9_-]{0,12}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,60}",
        "v1\\.[A-Za-z0-9_-]{8}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{43}",
        "\\.?[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,12}\\.[A-Za-z0-9_-]{0,60}",
        "[A-Za-z0-9_.=+/-]{0,300}",
        // A valid token of either kind with a random edit.
        (claims(), any::<usize>(), text(4)).prop_map(|(c, at_byte, insert)| {
            let token = signer(Digest::Sha1).mint_v1(&c);
            splice(&token, at_byte, &insert)
        }),
        (email(), any::<usize>(), text(4)).prop_map(|(e, at_byte, insert)| {
            let token = signer(Digest::Sha1).mint_itsdangerous(&e, at(1_764_000_000));
            splice(&token, at_byte, &insert)
        }),
    ]
}

fn splice(token: &str, at_byte: usize, insert: &str) -> String {
    let i = at_byte % (token.len() + 1);
    format!("{}{}{}", &token[..i], insert, &token[i..])
}

/// JSON without floats (a JSON reader may round those; see token_vectors.rs).
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        email().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(8), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Every one-character edit, at every position, of a few tokens of each kind.
#[test]
fn no_single_character_edit_of_a_token_survives() {
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ é"
            .chars()
            .collect();
    let now = at(1_764_000_000);
    let claims = Claims {
        request_id: "5f1c2a7e-0000-4000-8000-000000000001".into(),
        user_id: "42".into(),
        email: "用户@例子.公司".into(),
        purpose: "reset_password".into(),
        locale: Some("zh-CN".into()),
        issued_at: now,
        expires_at: at(1_764_003_600),
    };
    let sha1 = signer(Digest::Sha1);
    let sha256 = signer(Digest::Sha256);
    let v1 = sha1.mint_v1(&claims);
    let links = [
        (&sha1, sha1.mint_itsdangerous("josé@example.com", now)),
        (&sha256, sha256.mint_itsdangerous("josé@example.com", now)),
        // Compressed (leading '.').
        (&sha1, sha1.mint_itsdangerous(&"ab".repeat(40), now)),
    ];
    assert!(links[2].1.starts_with('.'));
    for i in 0..v1.len() {
        for &c in &alphabet {
            if let Some(forged) = replace_char(&v1, i, c) {
                let result = sha1.verify_v1(&forged, now);
                assert!(is_forgery_refusal(&result), "{forged} -> {result:?}");
            }
        }
    }
    for (s, token) in &links {
        for i in 0..token.len() {
            for &c in &alphabet {
                if let Some(forged) = replace_char(token, i, c) {
                    let result = s.verify_itsdangerous(&forged, 3600, now);
                    assert!(is_forgery_refusal(&result), "{forged} -> {result:?}");
                }
            }
        }
    }
}
