//! The machine's broker, then its database, restarted while requests and
//! clicks flow: nothing lost, nothing doubled, everyone back by themselves.
//! Both run only with `VERIMAIL_FAULT_TESTS=1` (see the binary's docs).

use std::time::{Duration, Instant};

use verimail_producer::{Producer, VerificationRequest};
use verimail_tests::procs::Proc;

use crate::SERIAL;
use crate::support::{
    BrokerDown, Clicks, DatabaseDown, Figures, Outage, Pipeline, click_all, dead_letters,
    machine_faults_allowed, quiesce, request_body,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_requests_and_clicks_flow_loses_nothing() {
    if !machine_faults_allowed("a_broker_restart_while_requests_and_clicks_flow_loses_nothing") {
        return;
    }
    const N: usize = 400;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let p = Pipeline::start("broker", 1, true, |_| {}).await;
    let producer = Producer::connect(&p.env.config())
        .await
        .expect("the producer connects")
        .with_source("/faults");
    let ids: Vec<String> = (0..N).map(|i| format!("brk-{i:05}")).collect();

    // Publish steadily (about 40 per second) through the producer library,
    // retrying a failed publish with the same id.
    let publishing = async {
        let mut retries = 0;
        for (i, id) in ids.iter().enumerate() {
            loop {
                let request =
                    VerificationRequest::new(format!("u-brk-{i}"), format!("brk{i}@example.com"))
                        .id(id.clone());
                match producer.request_verification(request).await {
                    Ok(_) => break,
                    Err(e) => {
                        retries += 1;
                        assert!(retries < 200, "the producer never got through: {e}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        retries
    };
    // Restart the broker's application a few seconds in, for a few seconds.
    let fault = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let guard = tokio::task::spawn_blocking(BrokerDown::stop)
            .await
            .expect("stop_app ran");
        tokio::time::sleep(Duration::from_secs(5)).await;
        tokio::task::spawn_blocking(move || guard.start())
            .await
            .expect("start_app ran")
    };
    let clicking = click_all(&p.smtp, N, Instant::now() + Duration::from_secs(75));
    let (publish_retries, outage, clicks) = tokio::join!(publishing, fault, clicking);

    let Settled {
        f,
        answered,
        verified,
        lost_verified,
        double_verified,
    } = settle(
        &p,
        ("broker restart", "broker"),
        &ids,
        started,
        outage,
        publish_retries,
        &clicks,
    )
    .await;

    let logs = p.worker_logs();
    assert!(answered && f.lost == 0, "requests lost: {f}\n{logs}");
    assert_eq!(f.double_outcomes, 0, "one outcome per request: {f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "every request sent: {f}");
    assert_eq!(f.duplicate_mails, 0, "no mail twice: {f}");
    assert!(
        clicks.unexpected.is_empty(),
        "unexpected answers: {:?}\n{f}",
        clicks.unexpected
    );
    assert_eq!(clicks.unavailable, 0, "clicks never need the broker: {f}");
    assert_eq!(clicks.confirmed.len(), N, "every link confirmed: {f}");
    assert!(verified && lost_verified == 0, "verified events lost: {f}");
    assert_eq!(double_verified, 0, "one verified event per link: {f}");

    // Everyone came back by themselves.
    assert!(
        p.all_ready(Duration::from_secs(20)).await,
        "worker and gateway ready again after the restart: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}\n{f}");
    producer.close().await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_while_requests_and_clicks_flow_loses_nothing_and_nothing_crash_loops() {
    if !machine_faults_allowed(
        "a_database_restart_while_requests_and_clicks_flow_loses_nothing_and_nothing_crash_loops",
    ) {
        return;
    }
    const N: usize = 400;
    const DOWN: Duration = Duration::from_secs(5);
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("db", 1, true, |_| {}).await;
    let ids: Vec<String> = (0..N).map(|i| format!("db-{i:05}")).collect();

    let publishing = async {
        let mut retries = 0;
        for (i, id) in ids.iter().enumerate() {
            let body = request_body(id, &format!("u-db-{i}"), &format!("db{i}@example.com"));
            retries += p.publish_raw(id, &body).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        retries
    };
    // Stop PostgreSQL a few seconds in, keep it down, start it again.
    let fault = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let guard = tokio::task::spawn_blocking(DatabaseDown::stop)
            .await
            .expect("pg_ctlcluster stop ran");
        tokio::time::sleep(DOWN).await;
        tokio::task::spawn_blocking(move || guard.start())
            .await
            .expect("pg_ctlcluster start ran")
    };
    let clicking = click_all(&p.smtp, N, Instant::now() + Duration::from_secs(80));
    let (publish_retries, outage, clicks) = tokio::join!(publishing, fault, clicking);

    let Settled {
        f,
        answered,
        verified,
        lost_verified,
        double_verified,
    } = settle(
        &p,
        ("database restart", "db"),
        &ids,
        started,
        outage,
        publish_retries,
        &clicks,
    )
    .await;
    let worker_running = p.workers.iter_mut().all(Proc::is_running);
    let gateway_running = p.gateway.as_mut().is_some_and(Proc::is_running);

    assert!(
        worker_running && gateway_running,
        "no process died: {f}\n{}",
        p.worker_logs()
    );
    assert!(
        answered && f.lost == 0,
        "requests lost: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(f.double_outcomes, 0, "one outcome per request: {f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "every request sent: {f}");
    assert_eq!(f.sent_without_mail, 0, "{f}");
    assert!(
        clicks.unexpected.is_empty(),
        "unexpected answers: {:?}\n{f}",
        clicks.unexpected
    );
    assert_eq!(
        clicks.confirmed.len(),
        N,
        "every link confirmed in the end: {f}"
    );
    assert!(verified && lost_verified == 0, "verified events lost: {f}");
    assert_eq!(double_verified, 0, "one verified event per link: {f}");
    assert!(
        p.all_ready(Duration::from_secs(20)).await,
        "worker and gateway ready again after the restart: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}\n{f}");
    p.stop().await;
}

/// What both restarts check once the fault is over.
struct Settled {
    f: Figures,
    /// Every request had its outcome within the minute.
    answered: bool,
    /// A verified event arrived for every confirmed link.
    verified: bool,
    /// Confirmed links without a verified event.
    lost_verified: usize,
    /// Links with more than one verified event.
    double_verified: usize,
}

/// Waits for every request's outcome and every confirmed link's verified
/// event, lets the deployment go quiet, then measures and prints the figures
/// of `scenario` with the outage (`service` names its lines: `broker`, `db`),
/// the publish retries and the clicks.
async fn settle(
    p: &Pipeline,
    (scenario, service): (&'static str, &str),
    ids: &[String],
    started: Instant,
    outage: Outage,
    publish_retries: u32,
    clicks: &Clicks,
) -> Settled {
    let answered = p.tap.wait_answered(ids, Duration::from_secs(60)).await;
    let verified = p
        .tap
        .wait_verified(clicks.confirmed.len(), Duration::from_secs(30))
        .await;
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    let mut f = Figures::measure(scenario, ids, &p.tap, &mails);
    let verified_by_request = p.tap.verified();
    let lost_verified = clicks
        .confirmed
        .iter()
        .filter(|id| !verified_by_request.contains_key(*id))
        .count();
    let double_verified = verified_by_request.values().filter(|n| **n > 1).count();
    f.note(
        &format!("{service}_stop_took_s"),
        format!("{:.1}", outage.stopping.as_secs_f64()),
    )
    .note(
        &format!("{service}_down_s"),
        format!("{:.1}", outage.down.as_secs_f64()),
    )
    .note("publish_retries", publish_retries)
    .note("clicks_confirmed", clicks.confirmed.len())
    .note("click_503", clicks.unavailable)
    .note("click_socket_errors", clicks.socket_errors)
    .note(
        "verified_events",
        verified_by_request.values().sum::<usize>(),
    )
    .note("lost_verified", lost_verified)
    .note("double_verified", double_verified)
    .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    Settled {
        f,
        answered,
        verified,
        lost_verified,
        double_verified,
    }
}
