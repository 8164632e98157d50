//! Ten thousand guesses through three gateways at once: exactly the allowed
//! tries are counted, the database agrees, and a new request still works.

use std::collections::BTreeMap;

use serde_json::json;
use verimail_tests::http;

use crate::support::{Deployment, code_in, wrong};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_guesses_through_three_gateways_count_at_most_the_limit() {
    const GUESSES: u64 = 10_000;
    const CONCURRENCY: u64 = 48;
    let d = Deployment::start("codes-brute", 3, |env| {
        env.set("CODE_MAX_ATTEMPTS", "5");
        // One client address makes every guess: the limit must not be
        // what stops them here, the attempt counter must.
        env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", "10000000");
    })
    .await;
    let (id, mail) = d
        .request_mail(&["--user-id", "60", "--email", "eve-target@example.com"])
        .await;
    let code = code_in(&mail.text).expect("a code");

    // 48 workers share the guesses, each sending to the three gateways in turn.
    let d = std::sync::Arc::new(d);
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let d = d.clone();
        let code = code.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen: Vec<(u16, String, Option<u64>)> = Vec::new();
            let mut n = w;
            while n < GUESSES {
                let g = usize::try_from(n % 3).unwrap_or(0);
                let (status, json) = d
                    .check_on(g, &json!({"user_id": "60", "code": wrong(&code, n)}))
                    .await;
                seen.push((
                    status,
                    json["status"].as_str().unwrap_or_default().to_owned(),
                    json["attempts_left"].as_u64(),
                ));
                n += CONCURRENCY;
            }
            seen
        }));
    }
    let mut by_answer: BTreeMap<(u16, String), u64> = BTreeMap::new();
    let mut left: Vec<u64> = Vec::new();
    for t in tasks {
        for (status, word, attempts_left) in t.await.expect("guessing task") {
            *by_answer.entry((status, word)).or_default() += 1;
            left.extend(attempts_left);
        }
    }
    // Exactly the allowed tries were counted, each remaining count once;
    // every other guess found the code locked.
    left.sort_unstable();
    assert_eq!(left, [0, 1, 2, 3, 4], "{by_answer:?}");
    assert_eq!(
        by_answer,
        BTreeMap::from([
            ((410, "locked".to_owned()), GUESSES - 5),
            ((422, "wrong_code".to_owned()), 5),
        ])
    );
    // The database agrees: five tries, not one more.
    let pool = sqlx::PgPool::connect(d.env.get("DATABASE_URL").unwrap_or_default())
        .await
        .expect("database");
    let tries: i32 = sqlx::query_scalar("SELECT code_attempts FROM requests WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("the request row");
    pool.close().await;
    assert_eq!(tries, 5);

    // The operator sees the guessing in the metrics, by status only.
    let metrics = http::get(&format!("{}/metrics", d.env.gateway_ops_url()), &[])
        .await
        .expect("metrics");
    assert!(
        metrics
            .2
            .contains(r#"verimail_gateway_code_checks_total{status="locked"}"#),
        "{}",
        metrics.2
    );
    assert!(
        !metrics.2.contains(&format!("\"{code}\"")),
        "the code is a metric label"
    );

    // The right code is dead now, on every gateway.
    for g in 0..3 {
        let (status, json) = d.check_on(g, &json!({"user_id": "60", "code": code})).await;
        assert_eq!((status, &json["status"]), (410, &json!("locked")), "{json}");
    }
    // A new request mails a new code that works.
    let (new_id, mail) = d
        .request_mail(&["--user-id", "60", "--email", "eve-target@example.com"])
        .await;
    let new_code = code_in(&mail.text).expect("a code");
    let (status, json) = d
        .check_on(2, &json!({"user_id": "60", "code": new_code}))
        .await;
    assert_eq!(
        (status, &json["request_id"]),
        (200, &json!(new_id)),
        "{json}"
    );
    assert_eq!(d.wait_verified(&new_id).await["data"]["method"], "code");
    assert!(d.verified_of(&id).is_empty());

    let d = std::sync::Arc::try_unwrap(d).unwrap_or_else(|_| panic!("tasks still hold it"));
    d.stop().await;
}
