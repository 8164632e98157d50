//! The gateway without a broker: clicks still succeed, their verified events
//! wait in the outbox and go out once the broker is there.

use std::time::{Duration, Instant};

use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::http;

use crate::SERIAL;
use crate::support::{Figures, Pipeline, click_all, start_gateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_succeed_without_a_broker_and_their_verified_events_go_out_once_it_is_there() {
    const N: usize = 20;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("nobroker", 1, false, |_| {}).await;
    // The gateway's broker is a closed port.
    let mut genv = p.env.clone();
    genv.set(
        "AMQP_URL",
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
    );
    let gateway = start_gateway(&genv).await;
    let ids = p.publish_many("nob", N).await;
    assert!(
        p.tap.wait_answered(&ids, Duration::from_secs(45)).await,
        "{}",
        p.worker_logs()
    );

    let clicks = click_all(&p.smtp, N, Instant::now() + Duration::from_secs(30)).await;
    let readyz = http::get(&format!("{}/readyz", genv.gateway_ops_url()), &[])
        .await
        .map(|a| a.0)
        .unwrap_or(0);
    // The relay has nowhere to publish: the events wait in the outbox.
    let waiting = outbox_rows(&p.env).await;
    let early = p.tap.verified().values().sum::<usize>();

    // The gateway comes back with the right broker URL, on the same port.
    assert_eq!(
        gateway.stop(Duration::from_secs(30)).await,
        Some(0),
        "gateway exits 0 without a broker"
    );
    p.gateway = Some(start_gateway(&p.env).await);
    let verified = p.tap.wait_verified(N, Duration::from_secs(30)).await;
    let verified_by_request = p.tap.verified();
    let mut f = Figures::measure("gateway without broker", &ids, &p.tap, &p.smtp.mails());
    f.note("clicks_confirmed", clicks.confirmed.len())
        .note("readyz_without_broker", readyz)
        .note("outbox_rows_waiting", waiting)
        .note("verified_before_broker", early)
        .note(
            "verified_after",
            verified_by_request.values().sum::<usize>(),
        )
        .note("outbox_rows_after", outbox_rows(&p.env).await)
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    assert!(
        clicks.unexpected.is_empty() && clicks.unavailable == 0,
        "{:?}\n{f}",
        clicks.unexpected
    );
    assert_eq!(
        clicks.confirmed.len(),
        N,
        "every click succeeds without a broker: {f}"
    );
    assert_eq!(readyz, 503, "not ready without a broker: {f}");
    assert_eq!(
        (early, waiting),
        (0, N as i64),
        "events wait in the outbox: {f}"
    );
    assert!(
        verified,
        "verified events go out once the broker is there: {f}"
    );
    assert!(
        ids.iter().all(|id| verified_by_request.get(id) == Some(&1)),
        "exactly one verified event per link: {f}"
    );
    p.stop().await;
}

async fn outbox_rows(env: &TestEnv) -> i64 {
    let pool = sqlx::PgPool::connect(env.get("DATABASE_URL").unwrap_or_default())
        .await
        .expect("the test reaches its database");
    let n = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .expect("outbox count");
    pool.close().await;
    n
}
