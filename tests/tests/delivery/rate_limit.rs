//! `MAIL_RATE_LIMIT` shared by several workers, measured at the sink: three
//! workers share one budget and a fourth does not raise it. `scripts/test.sh`
//! runs it alone, so other tests' load does not bunch the sends into bursts.

use std::time::{Duration, Instant};

use verimail_tests::api::ApiSink;

use crate::WAIT;
use crate::support::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_rate_limit_and_a_fourth_does_not_raise_it() {
    const N: usize = 3000;
    const RATE: f64 = 50.0;
    let sink = ApiSink::accepting().await.expect("the stand-in starts");
    let mut d = Deployment::start("rate", 0, |env| {
        env.set("MAIL_URL", format!("{}/mail", sink.base()));
        env.set("MAIL_RATE_LIMIT", "50/s");
        env.set("WORKER_CONCURRENCY", "64");
    })
    .await;
    for i in 0..N {
        d.publish(&format!("rate-{i}"), &format!("r{i}@example.com"))
            .await;
    }
    for _ in 0..3 {
        d.add_worker().await;
    }
    // A fourth worker joins half-way.
    let joined = loop {
        if sink.count() >= N / 2 {
            d.add_worker().await;
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Counted at the sink (cheap), then the outcomes once.
    let all_sent = verimail_tests::tap::eventually(Duration::from_secs(120), || async {
        (sink.count() >= N).then_some(())
    })
    .await;
    let all_done = d
        .tap
        .wait_for("verimail.verification.sent", N, WAIT)
        .await
        .len()
        >= N;
    let arrivals: Vec<Instant> = sink.received().iter().map(|r| r.at).collect();
    assert!(
        all_sent.is_some() && all_done,
        "{} of {N} sent",
        arrivals.len()
    );
    assert_eq!(arrivals.len(), N, "each mail once");
    assert!(d.tap.of_type("verimail.verification.failed").is_empty());
    assert!(d.tap.of_type("verimail.verification.throttled").is_empty());
    let rate =
        |a: &[Instant]| (a.len() - 1) as f64 / a[a.len() - 1].duration_since(a[0]).as_secs_f64();
    let overall = rate(&arrivals);
    assert!(
        (RATE * 0.9..=RATE * 1.1).contains(&overall),
        "{overall:.1} mails/s over the run"
    );
    let after: Vec<Instant> = arrivals
        .iter()
        .copied()
        .filter(|t| *t > joined + Duration::from_secs(2))
        .collect();
    let with_four = rate(&after);
    assert!(
        with_four <= RATE * 1.1,
        "{with_four:.1} mails/s with four workers"
    );
    // No burst: over any 2 s, at most twice the rate plus 10 %.
    let (mut most, mut worst) = (0, 0);
    let mut start = 0;
    for end in 0..arrivals.len() {
        while arrivals[end].duration_since(arrivals[start]) > Duration::from_secs(2) {
            start += 1;
        }
        if end - start + 1 > most {
            (most, worst) = (end - start + 1, start);
        }
    }
    let gaps: Vec<u128> = arrivals[worst..(worst + most).min(arrivals.len())]
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_millis())
        .collect();
    assert!(
        most as f64 <= 2.0 * RATE * 1.1,
        "{most} mails within 2 s, {:.1} s into the run; gaps (ms): {gaps:?}",
        arrivals[worst].duration_since(arrivals[0]).as_secs_f64()
    );
    eprintln!(
        "{overall:.1} mails/s overall, {with_four:.1} with four workers, at most {most} in 2 s"
    );
    // /metrics shows the time mails waited for the budget.
    let metrics = verimail_tests::http::get(&format!("http://{}/metrics", d.metrics[0]), &[])
        .await
        .expect("GET /metrics");
    let text = &metrics.2;
    let waited = text
        .lines()
        .find(|l| l.starts_with("verimail_worker_mail_rate_limit_wait_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(waited > 0.0, "no rate-limit wait in /metrics:\n{text}");
    d.stop().await;
}
