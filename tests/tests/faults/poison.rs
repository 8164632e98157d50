//! A flood of poison (bodies that are not events, events that break a rule)
//! among good requests: each bad one dead-lettered or answered, every good
//! one served, and the worker's memory flat.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use verimail_shared::events::VERIFICATION_REQUESTED;
use verimail_tests::procs::cli;
use verimail_tests::smtp::mail_request;

use crate::SERIAL;
use crate::support::{Figures, Pipeline, dead_letters, quiesce, request_body, rss_kib};

/// Bodies that are not CloudEvents at all: dead-lettered as `undecodable`.
fn undecodable(i: usize) -> Vec<u8> {
    match i % 10 {
        0 => b"not json at all".to_vec(),
        1 => b"{\"id\":\"truncated".to_vec(),
        2 => b"[1,2,3]".to_vec(),
        3 => b"null".to_vec(),
        4 => json!({"specversion": "1.0", "type": VERIFICATION_REQUESTED})
            .to_string()
            .into_bytes(),
        5 => json!({"id": i}).to_string().into_bytes(),
        6 => json!({"id": ""}).to_string().into_bytes(),
        7 => json!({"id": "x".repeat(129)}).to_string().into_bytes(),
        8 => vec![0xff, 0xfe, 0x00, 0x80, b'{', 0xc3],
        _ => Vec::new(),
    }
}

/// CloudEvents breaking one rule: answered `failed`/`invalid_request`, naming
/// the field.
fn invalid(id: &str, i: usize) -> (Vec<u8>, &'static str) {
    let mut event = json!({
        "specversion": "1.0", "id": id, "source": "/faults", "type": VERIFICATION_REQUESTED,
        "data": {"user_id": format!("u-{id}"), "email": format!("{id}@example.com")},
    });
    let field = match i % 10 {
        0 => {
            event["data"]["email"] = json!("not an address");
            "email"
        }
        1 => {
            event["data"]["user_id"] = json!(1.5);
            "user_id"
        }
        2 => {
            event["specversion"] = json!("0.3");
            "specversion"
        }
        3 => {
            event["type"] = json!("verimail.something.else");
            "type"
        }
        4 => {
            event["data"]["purpose"] = json!("delete_account");
            "purpose"
        }
        5 => {
            event["data"]["locale"] = json!("../../etc/passwd");
            "locale"
        }
        6 => {
            event["data"]["context"] = json!([1, 2]);
            "context"
        }
        7 => {
            event["data"]["name"] = json!("n".repeat(300));
            "name"
        }
        8 => {
            event["data"] = json!("a string");
            "data"
        }
        _ => {
            event["data"]["return_url"] = json!("javascript:alert(1)");
            "return_url"
        }
    };
    (event.to_string().into_bytes(), field)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_or_answered_while_every_good_request_is_served() {
    const GOOD: usize = 200;
    const UNDECODABLE: usize = 500;
    const INVALID: usize = 500;
    const WARMUP: usize = 50;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let p = Pipeline::start("poison", 1, false, |_| {}).await;
    let pid = p.workers[0].pid().expect("the worker runs");

    // Warm up with good requests, so the first measure is of a worker at work.
    let warm = p.publish_many("warm", WARMUP).await;
    assert!(
        p.tap.wait_answered(&warm, Duration::from_secs(45)).await,
        "{}",
        p.worker_logs()
    );
    let rss_before = rss_kib(pid);

    // Good, undecodable and invalid interleaved.
    let mut good = Vec::new();
    let mut bad_invalid = Vec::new();
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..(GOOD + UNDECODABLE + INVALID) {
        match i % 6 {
            0 if good.len() < GOOD => {
                let id = format!("good-{i:05}");
                messages.push((
                    id.clone(),
                    request_body(&id, &format!("u-good-{i}"), &format!("good{i}@example.com")),
                ));
                good.push(id);
            }
            1 | 3 | 5 if bad_invalid.len() < INVALID => {
                let id = format!("inv-{i:05}");
                let (body, field) = invalid(&id, bad_invalid.len());
                messages.push((id.clone(), body));
                bad_invalid.push((id, field));
            }
            _ => messages.push((format!("und-{i:05}"), undecodable(i))),
        }
    }
    let undecodable_sent = messages.len() - good.len() - bad_invalid.len();
    let pipeline = &p;
    futures_util::stream::iter(messages.iter())
        .for_each_concurrent(64, |(id, body)| async move {
            pipeline.publish_raw(id, body).await;
        })
        .await;
    let invalid_ids: Vec<String> = bad_invalid.iter().map(|(id, _)| id.clone()).collect();
    let good_done = p.tap.wait_answered(&good, Duration::from_secs(60)).await;
    let invalid_done = p
        .tap
        .wait_answered(&invalid_ids, Duration::from_secs(60))
        .await;
    quiesce(&p.env, Duration::from_secs(30)).await;
    let rss_after = rss_kib(pid);

    let dead = dead_letters(&p.env).await;
    let dead_undecodable = dead.iter().filter(|l| l["reason"] == "undecodable").count();
    let (code, replay_out, replay_err) = cli(&["dead", "replay", "--all"], &p.env).await;
    let dead_after_replay = dead_letters(&p.env).await.len();

    let mails = p.smtp.mails();
    let good_figures = Figures::measure("poison: good", &good, &p.tap, &mails);
    let mut f = Figures::measure("poison: invalid", &invalid_ids, &p.tap, &mails);
    let outcomes = p.tap.outcomes();
    let misnamed: Vec<String> = bad_invalid
        .iter()
        .filter(|(id, field)| {
            !outcomes.get(id).is_some_and(|l| {
                l.len() == 1
                    && l[0]["data"]["reason"] == "invalid_request"
                    && l[0]["data"]["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with(&format!("{field}:")))
            })
        })
        .map(|(id, field)| format!("{id} ({field}): {:?}", outcomes.get(id)))
        .collect();
    let mails_for_bad = mails
        .iter()
        .filter(|m| !mail_request(m).starts_with("good-") && !mail_request(m).starts_with("warm-"))
        .count();
    f.note("good", &good_figures)
        .note("undecodable_published", undecodable_sent)
        .note("dead_letters", dead.len())
        .note("dead_undecodable", dead_undecodable)
        .note("dead_after_replay_all", dead_after_replay)
        .note("mails_for_bad", mails_for_bad)
        .note("rss_before_kib", rss_before)
        .note("rss_after_kib", rss_after)
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();

    assert!(
        good_done && good_figures.lost == 0,
        "good requests lost: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(good_figures.outcomes.get("sent"), Some(&GOOD), "{f}");
    assert_eq!(
        (good_figures.mails, mails_for_bad),
        (GOOD + WARMUP, 0),
        "{f}"
    );
    assert!(invalid_done && f.lost == 0, "{f}");
    assert_eq!(
        f.outcomes.get("failed/invalid_request"),
        Some(&INVALID),
        "{f}"
    );
    assert!(
        misnamed.is_empty(),
        "details must name the field: {misnamed:?}"
    );
    assert_eq!(
        (dead.len(), dead_undecodable),
        (undecodable_sent, undecodable_sent),
        "{f}"
    );
    assert_eq!(
        code, 0,
        "replay --all with only undecodable letters: {replay_err}"
    );
    assert!(
        replay_out.trim().is_empty(),
        "nothing replayed: {replay_out}"
    );
    assert!(
        replay_err.contains(&format!("{undecodable_sent} undecodable")),
        "replay says how many stay: {replay_err}"
    );
    assert_eq!(
        dead_after_replay, undecodable_sent,
        "undecodable letters stay in place: {f}"
    );
    // Roughly flat: allocator caches may keep some, a leak per message would not fit.
    assert!(
        rss_after < rss_before + 48 * 1024,
        "worker memory grew from {rss_before} KiB to {rss_after} KiB: {f}"
    );
    p.stop().await;
}
