//! A reset-password code answers with the proof a redirect would carry, and
//! spends the link; the link spends the code; both at once, one wins.

use serde_json::json;
use time::OffsetDateTime;
use verimail_shared::token::Signer;
use verimail_tests::http::{self, header};

use crate::support::{Deployment, code_in, wrong};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_password_code_answers_a_proof_and_spends_the_link_and_the_other_way_round() {
    let d = Deployment::start("codes-reset", 1, |env| {
        env.set("RETURN_URL_ALLOWLIST", "https://app.example.com");
    })
    .await;
    let signer = Signer::new(
        &d.env.config().keys().expect("keys"),
        d.env.config().itsdangerous_digest,
    );
    let reset = |user: &'static str| {
        [
            "--user-id",
            user,
            "--email",
            "carol@example.com",
            "--purpose",
            "reset_password",
            "--return-url",
            "https://app.example.com/reset",
        ]
    };

    // Code first: 200 with the PROOF a redirect would carry; the link is spent.
    let (id, mail) = d.request_mail(&reset("50")).await;
    let code = code_in(&mail.text).expect("a code");
    let link = mail.link.clone().expect("a link");
    let (status, json) = d
        .check(&json!({"user_id": "50", "purpose": "reset_password", "code": code}))
        .await;
    assert_eq!(
        (status, &json["status"]),
        (200, &json!("verified")),
        "{json}"
    );
    let proof = json["proof"].as_str().expect("a proof");
    let payload = signer
        .verify_proof(proof, OffsetDateTime::now_utc())
        .expect("the proof verifies like a redirect's");
    assert_eq!(payload.request_id.as_deref(), Some(id.as_str()));
    assert_eq!(payload.user_id.as_deref(), Some("50"));
    assert_eq!(payload.email, "carol@example.com");
    assert_eq!(payload.purpose, "reset_password");
    assert_eq!(d.wait_verified(&id).await["data"]["method"], "code");
    let pressed = http::post(&link, &[]).await.expect("press");
    assert_eq!(pressed.0, 410, "the link of a used code is spent");
    assert!(header(&pressed, "location").is_none());
    // The code again (right or wrong): used, never a second proof.
    for try_code in [code.clone(), wrong(&code, 1)] {
        let (status, json) = d
            .check(&json!({"user_id": "50", "purpose": "reset_password", "code": try_code}))
            .await;
        assert_eq!((status, &json["status"]), (410, &json!("used")), "{json}");
        assert!(json.get("proof").is_none());
    }

    // Link first: the redirect carries the proof; the code is spent.
    let (other, mail) = d.request_mail(&reset("51")).await;
    let code = code_in(&mail.text).expect("a code");
    let pressed = http::post(&mail.link.clone().expect("a link"), &[])
        .await
        .expect("press");
    assert_eq!(pressed.0, 303, "{}", pressed.2);
    assert!(header(&pressed, "location").is_some_and(|l| l.contains("verimail_proof=")));
    let (status, json) = d
        .check(&json!({"user_id": "51", "purpose": "reset_password", "code": code}))
        .await;
    assert_eq!((status, &json["status"]), (410, &json!("used")), "{json}");
    assert!(json.get("proof").is_none());
    assert_eq!(d.wait_verified(&other).await["data"]["method"], "link");

    // Link and code at the same instant: one of them confirms, the other
    // hears `used`, and one event goes out.
    let (raced, mail) = d.request_mail(&reset("52")).await;
    let code = code_in(&mail.text).expect("a code");
    let link = mail.link.clone().expect("a link");
    let body = json!({"user_id": "52", "purpose": "reset_password", "code": code});
    let (pressed, (status, json)) = tokio::join!(http::post(&link, &[]), d.check(&body));
    let pressed = pressed.expect("press").0;
    let winners = usize::from(pressed == 303) + usize::from(status == 200);
    assert_eq!(winners, 1, "link {pressed}, code {status} {json}");
    assert!(
        pressed == 410 || status == 410,
        "link {pressed}, code {status}"
    );

    d.barrier().await;
    assert_eq!(d.verified_of(&id).len(), 1);
    assert_eq!(d.verified_of(&other).len(), 1);
    assert_eq!(d.verified_of(&raced).len(), 1);
    d.stop().await;
}
