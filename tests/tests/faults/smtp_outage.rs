//! The SMTP server away: mails held up are delivered exactly once when it
//! returns; past the retry window they fail, are dead-lettered, and a replay
//! sends them.

use std::time::{Duration, Instant};

use verimail_shared::events::VERIFICATION_SENT;
use verimail_tests::procs::cli;

use crate::SERIAL;
use crate::support::{Figures, Pipeline, dead_letters, quiesce};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_held_up_by_an_smtp_outage_are_delivered_exactly_once_when_it_returns() {
    const N: usize = 60;
    const OUTAGE: Duration = Duration::from_secs(10);
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("smtp", 1, false, |_| {}).await;
    // Down before the requests arrive, so no mail is cut half-way (an SMTP
    // server that accepted a mail but whose 250 was lost is the one window
    // SMTP itself leaves for a duplicate).
    p.smtp.stop();
    let down_at = Instant::now();
    let ids = p.publish_many("smtp", N).await;
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
    let answered_during_outage = p.tap.answered(&ids);
    p.smtp.resume();
    let back_at = Instant::now();

    let all = p.tap.wait_answered(&ids, Duration::from_secs(75)).await;
    let delivered_after = back_at.elapsed();
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    let mut f = Figures::measure("smtp outage", &ids, &p.tap, &mails);
    f.note("outage_s", format!("{:.1}", OUTAGE.as_secs_f64()))
        .note("answered_during_outage", answered_during_outage)
        .note(
            "all_answered_after_return_s",
            format!("{:.1}", delivered_after.as_secs_f64()),
        )
        .note("smtp_connections", p.smtp.stats().connections)
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    assert_eq!(
        answered_during_outage, 0,
        "nothing is answered while the server is away: {f}"
    );
    assert!(
        all && f.lost == 0,
        "requests lost: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(
        f.outcomes.get("sent"),
        Some(&N),
        "every request sent once it returned: {f}"
    );
    assert_eq!(f.double_outcomes, 0, "{f}");
    assert_eq!(
        (f.mails, f.duplicate_mails),
        (N, 0),
        "every mail exactly once: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_outage_past_the_retry_window_fails_dead_letters_and_replays_to_a_sent_mail() {
    const N: usize = 3;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("window", 1, false, |env| {
        env.set("MAIL_RETRY_WINDOW_SECONDS", "8");
    })
    .await;
    p.smtp.stop();
    let ids = p.publish_many("win", N).await;
    let failed = p.tap.wait_answered(&ids, Duration::from_secs(60)).await;
    let gave_up_in = started.elapsed();
    let mut f = Figures::measure("smtp past the window", &ids, &p.tap, &p.smtp.mails());
    assert!(
        failed,
        "no outcome while the server stays away: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(f.outcomes.get("failed/delivery_failed"), Some(&N), "{f}");

    let dead = dead_letters(&p.env).await;
    let mut dead_ids: Vec<&str> = dead.iter().filter_map(|l| l["id"].as_str()).collect();
    dead_ids.sort_unstable();
    assert_eq!(
        dead_ids,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "{dead:?}"
    );
    assert!(
        dead.iter().all(|l| l["reason"] == "delivery_failed"),
        "{dead:?}"
    );

    // The server is back: the operator replays the letters.
    p.smtp.resume();
    let (code, out, err) = cli(&["dead", "replay", "--all"], &p.env).await;
    assert_eq!(code, 0, "dead replay failed: {err}");
    assert_eq!(
        out.lines().count(),
        N,
        "one line per replayed letter: {out}"
    );
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut sent = 0;
    while Instant::now() < deadline {
        let outcomes = p.tap.outcomes();
        sent = ids
            .iter()
            .filter(|id| {
                outcomes
                    .get(*id)
                    .is_some_and(|l| l.iter().any(|e| e["type"] == VERIFICATION_SENT))
            })
            .count();
        if sent == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    f = Figures::measure("smtp past the window, replayed", &ids, &p.tap, &mails);
    f.note(
        "gave_up_after_s",
        format!("{:.1}", gave_up_in.as_secs_f64()),
    )
    .note("dead_letters", dead.len())
    .note("sent_after_replay", sent)
    .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    assert_eq!(
        sent,
        N,
        "every replayed request ends sent: {f}\n{}",
        p.worker_logs()
    );
    // Two outcomes per request, by design: the replay reopened a request whose
    // `failed` went out, and its new attempt ends `sent`.
    assert_eq!(f.outcomes.get("failed/delivery_failed"), Some(&N), "{f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "{f}");
    assert_eq!((f.mails, f.duplicate_mails), (N, 0), "one mail each: {f}");
    assert!(
        dead_letters(&p.env).await.is_empty(),
        "the letters are gone once replayed"
    );
    p.stop().await;
}
