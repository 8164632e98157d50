//! `CONFIRM_METHOD=code`: the mail has a code and no link, and a duplicate
//! request mails no second code.

use serde_json::json;
use verimail_tests::http;

use crate::WAIT;
use crate::support::{Deployment, code_in, shown_large};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_confirm_method_code_the_mail_has_a_code_and_no_link() {
    let d = Deployment::start("codes-only", 1, |env| {
        env.set("CONFIRM_METHOD", "code");
        env.set("CODE_LENGTH", "8");
    })
    .await;
    let (id, mail) = d
        .request_mail(&[
            "--user-id",
            "7",
            "--email",
            "dan@example.com",
            "--locale",
            "zh-CN",
        ])
        .await;
    let code = code_in(&mail.text).unwrap_or_else(|| panic!("no code line in:\n{}", mail.text));
    assert_eq!(code.len(), 8);
    assert!(mail.text.contains("验证码"), "{}", mail.text);
    assert!(shown_large(&mail.html, &code), "{}", mail.html);
    assert!(mail.link.is_none(), "{}", mail.text);
    for part in [&mail.text, &mail.html] {
        assert!(!part.contains("/confirm/"), "{part}");
        assert!(!part.contains("href"), "{part}");
    }

    // The same request published again: the worker sees the duplicate (its
    // metric is the signal to wait for), mails nothing, and the one code
    // mailed is still the one that works.
    let again = d
        .publish(&["--id", &id, "--user-id", "7", "--email", "dan@example.com"])
        .await;
    assert_eq!(again, id);
    let metrics = format!(
        "http://{}/metrics",
        d.env.get("METRICS_ADDR").unwrap_or_default()
    );
    let seen = verimail_tests::tap::eventually(WAIT, || async {
        let text = http::get(&metrics, &[]).await.ok()?.2;
        text.contains(r#"verimail_worker_duplicates_total{state="done"} 1"#)
            .then_some(())
    })
    .await;
    assert!(seen.is_some(), "the worker never saw the duplicate");
    assert_eq!(d.smtp.count(), 1, "a duplicate mails no second code");

    let (status, json) = d.check(&json!({"user_id": 7, "code": code})).await;
    assert_eq!(
        (status, &json["status"]),
        (200, &json!("verified")),
        "{json}"
    );
    assert_eq!(d.wait_verified(&id).await["data"]["method"], "code");
    d.stop().await;
}
