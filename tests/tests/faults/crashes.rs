//! A worker killed with SIGKILL mid-stream: its replacement finishes what it
//! held, nothing is lost, and duplicates stay within the crash window.

use std::time::{Duration, Instant};

use crate::support::{Figures, Pipeline, dead_letters, quiesce};
use crate::{CONCURRENCY, SERIAL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_no_request_and_its_replacement_finishes_them() {
    const N: usize = 1500;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("kill", 1, false, |_| {}).await;
    let ids = p.publish_many("kill", N).await;
    let published_in = started.elapsed();

    // Kill the worker once about a third of the requests are answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.tap.answered(&ids) < N / 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = p.workers.remove(0);
    p.worker_readyz.remove(0);
    victim.kill().await;
    let answered_at_kill = p.tap.answered(&ids);
    let mails_at_kill = p.smtp.count();
    assert!(
        answered_at_kill < N,
        "the worker finished everything before it could be killed ({answered_at_kill}/{N})"
    );
    let killed_at = Instant::now();
    p.add_worker().await;

    // Requests the dead worker held stay leased for the worker's LEASE (60 s):
    // their redeliveries wait in the retry queue until it runs out.
    let all = p.tap.wait_answered(&ids, Duration::from_secs(120)).await;
    let recovered_in = killed_at.elapsed();
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    let mut f = Figures::measure("worker SIGKILL", &ids, &p.tap, &mails);
    f.note("answered_at_kill", answered_at_kill)
        .note("mails_at_kill", mails_at_kill)
        .note(
            "published_in_s",
            format!("{:.1}", published_in.as_secs_f64()),
        )
        .note(
            "recovered_in_s",
            format!("{:.1}", recovered_in.as_secs_f64()),
        )
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    let logs = p.worker_logs();
    assert!(all && f.lost == 0, "requests lost: {f}\n{logs}");
    assert_eq!(f.double_outcomes, 0, "one outcome per request: {f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "every request sent: {f}");
    assert_eq!(
        f.sent_without_mail, 0,
        "every sent request has its mail: {f}"
    );
    // The crash window: a mail the SMTP server accepted before the outcome was
    // stored is sent again by the redelivery, at most one per delivery in flight.
    assert!(
        f.duplicate_mails <= CONCURRENCY,
        "more duplicates than deliveries in flight: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}\n{f}");
    p.stop().await;
}
