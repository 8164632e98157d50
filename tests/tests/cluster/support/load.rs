//! The load: requests published at a pace, each retried with its id until
//! the broker confirms it, and every mailed link clicked as a user would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{Outgoing, Publisher, Topology};
use verimail_shared::events::VERIFICATION_REQUESTED;
use verimail_shared::token::Signer;
use verimail_tests::http;
use verimail_tests::smtp::SmtpServer;

use super::lock;
use crate::WAIT;

/// A `verimail.verification.requested` event for `user` (one user per request,
/// so no request is throttled and each one is a mail).
fn request_body(id: &str, user: &str) -> Vec<u8> {
    let event = json!({
        "specversion": "1.0",
        "id": id,
        "source": "/tests/cluster",
        "type": VERIFICATION_REQUESTED,
        "time": OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default(),
        "datacontenttype": "application/json",
        "data": {"user_id": user, "email": format!("{user}@example.com")},
    });
    serde_json::to_vec(&event).unwrap_or_default()
}

/// What the publisher did.
#[derive(Debug, Default)]
pub struct Published {
    /// Ids the broker confirmed.
    pub confirmed: Vec<String>,
    /// Ids never confirmed within the deadline.
    pub unconfirmed: Vec<String>,
    /// Publish attempts that failed and were retried (same id).
    pub retries: u64,
    /// The longest one request took to be confirmed, retries included.
    pub slowest: Duration,
    /// From the first publish to the last confirm.
    pub took: Duration,
}

/// Publishes `n` requests at `rate` per second (at most 128 awaiting their
/// confirm), each retried with the same id until the broker confirms it.
pub async fn publish_paced(
    publisher: Arc<Publisher>,
    topology: Topology,
    n: usize,
    rate: f64,
) -> Published {
    let prefix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let in_flight = Arc::new(Semaphore::new(128));
    let retries = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let publisher = publisher.clone();
        let topology = topology.clone();
        let retries = retries.clone();
        let id = uuid::Uuid::now_v7().to_string();
        let body = request_body(&id, &format!("c{prefix}-{i}"));
        tasks.spawn(async move {
            let _permit = permit;
            let began = Instant::now();
            let msg = Outgoing::event(&topology, VERIFICATION_REQUESTED, &id, &body);
            let mut wait = Duration::from_millis(100);
            loop {
                match publisher.publish(&msg).await {
                    Ok(()) => return (id, true, began.elapsed()),
                    Err(_) if began.elapsed() > WAIT * 2 => return (id, false, began.elapsed()),
                    Err(_) => {
                        retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }
    let mut out = Published::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok((id, ok, took)) = done {
            out.slowest = out.slowest.max(took);
            if ok {
                out.confirmed.push(id);
            } else {
                out.unconfirmed.push(id);
            }
        }
    }
    out.retries = retries.load(Ordering::Relaxed);
    out.took = start.elapsed();
    out
}

/// The clicker's record.
#[derive(Debug, Default)]
pub struct Clicks {
    /// Mails looked at so far (index into the SMTP server's list).
    pub mails: usize,
    /// Distinct `Message-ID`s (the worker derives it from the request id).
    pub message_ids: HashSet<String>,
    /// Mails whose `Message-ID` was seen before: a request mailed twice.
    pub duplicate_mails: u64,
    /// Mails without a `/confirm/` link or with a token that did not verify.
    pub unusable: u64,
    /// Request id → (HTTP status, JSON `status`, made again after a 503)
    /// of its click(s).
    pub answers: HashMap<String, Vec<(u16, String, bool)>>,
    /// Clicks that could not be made (connection refused...).
    pub errors: u64,
    /// Clicks finished, answered or not.
    pub finished: usize,
    /// When the last click finished.
    pub last_at: Option<Instant>,
    /// Clicks answered 503 and made again.
    pub retried_503: u64,
}

/// Clicks every link the SMTP server captures (as the user would, with
/// `Accept: application/json`), at most 16 at once, until `stop`.
pub async fn click_links(
    smtp: Arc<SmtpServer>,
    signer: Arc<Signer>,
    clicks: Arc<Mutex<Clicks>>,
    pending: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let parallel = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let done = lock(&clicks).mails;
        if smtp.count() > done {
            // mails() parses every mail so far (the list only grows, in
            // order): called every 2 s, not on every new mail, as the parsing
            // of thousands of mails, unoptimized, would take a core.
            let mails = smtp.mails();
            for mail in mails.iter().skip(done) {
                let mut c = lock(&clicks);
                c.mails += 1;
                let fresh = mail
                    .message_id
                    .as_ref()
                    .is_none_or(|m| c.message_ids.insert(m.clone()));
                if !fresh {
                    c.duplicate_mails += 1;
                }
                let Some(link) = mail.link.clone() else {
                    c.unusable += 1;
                    continue;
                };
                let token = link.rsplit('/').next().unwrap_or_default().to_owned();
                let Ok(claims) = signer.verify_v1(&token, OffsetDateTime::now_utc()) else {
                    c.unusable += 1;
                    continue;
                };
                drop(c);
                pending.fetch_add(1, Ordering::SeqCst);
                let (parallel, clicks, pending) =
                    (parallel.clone(), clicks.clone(), pending.clone());
                tasks.spawn(async move {
                    let _permit = parallel.acquire_owned().await;
                    // A 503 (database unreachable) is what a user retries: so
                    // does the clicker, a few times, counting it.
                    let mut tries = 0;
                    let answer = loop {
                        tries += 1;
                        let answer = http::post(&link, &[("Accept", "application/json")]).await;
                        match answer {
                            Ok((503, _, _)) if tries < 10 => {
                                lock(&clicks).retried_503 += 1;
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            other => break other,
                        }
                    };
                    let mut c = lock(&clicks);
                    match answer {
                        Ok((code, _, body)) => {
                            let status = serde_json::from_str::<Value>(&body)
                                .ok()
                                .and_then(|v| v["status"].as_str().map(str::to_owned))
                                .unwrap_or_default();
                            c.answers.entry(claims.request_id).or_default().push((
                                code,
                                status,
                                tries > 1,
                            ));
                        }
                        Err(_) => c.errors += 1,
                    }
                    c.finished += 1;
                    c.last_at = Some(Instant::now());
                    pending.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    tasks.shutdown().await;
}
