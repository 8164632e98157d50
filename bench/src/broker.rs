//! RabbitMQ helpers shared by the subcommands: connecting, request bodies,
//! preloading a queue with confirmed publishes.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use verimail_shared::bus::Topology;
use verimail_shared::events::{
    CONTENT_TYPE, VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT,
    VERIFICATION_THROTTLED,
};

use crate::system::*;

pub(crate) fn default_amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub(crate) async fn amqp(url: &str) -> Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name("verimail-bench".into()),
    )
    .await
    .context("cannot connect to RabbitMQ")
}

pub(crate) fn unique_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("b{}", &id[..8])
}

pub(crate) fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// A `verimail.verification.requested` CloudEvent for user `user`.
pub(crate) fn request_body(id: &str, user: &str, context: Option<Value>) -> Vec<u8> {
    let mut data = json!({
        "user_id": user,
        "email": format!("{user}@example.com"),
        "name": format!("User {user}"),
    });
    if let Some(context) = context {
        data["context"] = context;
    }
    let event = json!({
        "specversion": "1.0",
        "id": id,
        "source": "/bench",
        "type": VERIFICATION_REQUESTED,
        "time": now_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    });
    serde_json::to_vec(&event).unwrap_or_default()
}

pub(crate) fn event_props(id: &str, ty: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_type(ty.into())
}

/// WORKER_CONCURRENCY of the throughput and latency runs, and the ceiling's
/// prefetch. At the former default (64) a worker is latency-bound on this
/// machine (each prefetch slot turns over in about 15 ms: 11-12 ms from
/// delivery to ack, then the broker's round trip for the next delivery; so
/// about 4,000 mails/s by Little's law, with the CPU not saturated); at 256
/// the database batches grow and the machine's CPU becomes the limit. The
/// former default is measured too (`worker_default`); 256 is now the default.
pub(crate) const TUNED_CONCURRENCY: u16 = 256;

/// The outcome types (a `verimail.verification.*` binding would also catch the requests).
pub(crate) const OUTCOMES: &[&str] = &[
    VERIFICATION_SENT,
    VERIFICATION_THROTTLED,
    VERIFICATION_FAILED,
];

pub(crate) const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// Publishes N requests with confirms, keeping up to 1,000 unconfirmed in
/// flight; fails on any nack or return. Returns (seconds, per second).
pub(crate) async fn preload(
    conn: &Connection,
    topology: &Topology,
    n: usize,
    prefix: &str,
) -> Result<(f64, f64)> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let body = request_body(&id, &format!("{prefix}-{i}"), None);
        let confirm = ch
            .basic_publish(
                topology.exchange().into(),
                VERIFICATION_REQUESTED.into(),
                MANDATORY,
                &body,
                event_props(&id, VERIFICATION_REQUESTED),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= 1_000
            && let Some(c) = pending.pop_front()
        {
            check_confirm(c.await?)?;
        }
    }
    while let Some(c) = pending.pop_front() {
        check_confirm(c.await?)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = ch.close(200, "preloaded".into()).await;
    Ok((secs, rate(n, secs)))
}

pub(crate) fn check_confirm(c: lapin::Confirmation) -> Result<()> {
    if c.is_nack() {
        bail!("the broker nacked a publish");
    }
    if c.take_message().is_some() {
        bail!("a publish was returned unroutable (is the queue bound?)");
    }
    Ok(())
}
