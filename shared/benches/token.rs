//! Token minting and verification costs, in nanoseconds per operation.
//!
//! `cargo bench -p verimail-shared --bench token` (a plain binary: no harness, no
//! criterion). Each case warms up, then runs timed batches for about half a second and
//! reports the best batch's mean, which is the least disturbed by other processes.

use std::hint::black_box;

use secrecy::SecretString;
use time::OffsetDateTime;
use verimail_shared::token::{Claims, Digest, Keys, ProofPayload, Signer};

#[path = "support/timing.rs"]
mod timing;

const BATCH: u32 = 1_000;

fn bench(name: &str, op: impl FnMut()) {
    let best = timing::best_mean_ns(BATCH, op);
    println!("{name:<32} {best:>9.0} ns/op");
}

fn main() {
    let now = OffsetDateTime::from_unix_timestamp(1_764_000_000).expect("in range");
    let signer = |digest| {
        let keys = Keys::new(
            SecretString::from("a 32-byte random secret, base64ed"),
            vec![SecretString::from("the previous secret")],
            "email-confirm".to_owned(),
        );
        Signer::new(&keys, digest)
    };
    let sha1 = signer(Digest::Sha1);
    let sha256 = signer(Digest::Sha256);
    let claims = Claims {
        request_id: "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
        user_id: "42".into(),
        email: "alice@example.com".into(),
        purpose: "verify_email".into(),
        locale: Some("zh-CN".into()),
        issued_at: now,
        expires_at: now + time::Duration::hours(1),
    };
    let v1 = sha1.mint_v1(&claims);
    println!("v1 token: {} bytes", v1.len());

    bench("v1 mint", || {
        black_box(sha1.mint_v1(black_box(&claims)));
    });
    bench("v1 verify", || {
        let _ = black_box(sha1.verify_v1(black_box(&v1), now));
    });
    bench("v1 mint+verify", || {
        let token = sha1.mint_v1(black_box(&claims));
        let _ = black_box(sha1.verify_v1(&token, now));
    });
    // Same length, one payload character changed: the full HMAC runs and fails.
    let mut forged = v1.clone().into_bytes();
    forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ASCII");
    bench("v1 verify, bad signature", || {
        let _ = black_box(sha1.verify_v1(black_box(&forged), now));
    });

    for (name, s) in [("sha1", &sha1), ("sha256", &sha256)] {
        let token = s.mint_itsdangerous("alice@example.com", now);
        bench(&format!("itsdangerous {name} mint"), || {
            black_box(s.mint_itsdangerous(black_box("alice@example.com"), now));
        });
        bench(&format!("itsdangerous {name} verify"), || {
            let _ = black_box(s.verify_itsdangerous(black_box(&token), 3600, now));
        });
    }
    let long = "a".repeat(60) + "@example.com";
    let packed = sha1.mint_itsdangerous(&long, now);
    bench("itsdangerous sha1 verify, zlib", || {
        let _ = black_box(sha1.verify_itsdangerous(black_box(&packed), 3600, now));
    });

    let proof = ProofPayload {
        request_id: Some(claims.request_id.clone()),
        user_id: Some("42".into()),
        email: "alice@example.com".into(),
        purpose: "reset_password".into(),
    };
    bench("proof mint", || {
        black_box(sha1.mint_proof(black_box(&proof), now));
    });
    bench("inspect v1", || {
        black_box(sha1.inspect(black_box(&v1), 3600, now));
    });
}
