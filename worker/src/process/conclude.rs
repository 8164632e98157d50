//! The end of a delivery: its outcome stored (`done`) and published, the
//! published mark after the ack, and copies to the retry queues.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use lapin::message::Delivery;
use serde::Serialize;
use time::OffsetDateTime;
use tracing::{debug, instrument, warn};
use verimail_shared::bus::{BusError, Outgoing};
use verimail_shared::events::{CloudEvent, VERIFICATION_REQUESTED};

use super::persist::persist;
use super::{AfterAck, Ctx, Failure, SOURCE, duplicate};
use crate::metrics;
use crate::retry;
use crate::store::{Claim, Finish, Mark};

/// Records that the outcome of request `id` was confirmed, after its delivery
/// was acknowledged: the delivery's prefetch slot is free by then. Only the
/// shutdown deadline stops it (the write is retried); then a later duplicate
/// re-publishes the same event (ARCHITECTURE.md, crash window 3).
#[instrument(name = "mark", skip_all, fields(request_id = mark.request_id))]
pub async fn mark_after_ack(ctx: &Ctx, mark: &Mark) {
    let t = Instant::now();
    let _ = mark_published(ctx, mark).await;
    metrics::step("mark", t.elapsed());
}

/// Records that the broker confirmed the outcome (batched with other
/// deliveries' conclusions; alone, with retries, when that batch failed).
pub(super) async fn mark_published(ctx: &Ctx, mark: &Mark) -> Result<(), Failure> {
    persist(ctx, "marking the outcome published", || {
        ctx.batches.mark_published(mark)
    })
    .await
}

/// An outcome event, built once (its bytes are stored, then published).
pub(super) struct OutcomeEvent {
    pub(super) id: String,
    ty: &'static str,
    bytes: Vec<u8>,
    label: (&'static str, &'static str),
}

impl OutcomeEvent {
    pub(super) fn new<T: Serialize>(
        ty: &'static str,
        data: T,
        traceparent: Option<String>,
    ) -> Self {
        let mut event = CloudEvent::new(ty, SOURCE, data);
        event.traceparent = traceparent;
        Self {
            id: event.id.clone(),
            ty,
            bytes: event.to_bytes(),
            label: ("", ""),
        }
    }

    pub(super) fn counted(mut self, outcome: &'static str, reason: &'static str) -> Self {
        self.label = (outcome, reason);
        self
    }
}

/// A mail the SMTP server accepted: when, and the keyed hash of its code.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sent<'a> {
    pub(super) at: OffsetDateTime,
    pub(super) code_hash: Option<&'a [u8]>,
    /// The HTTP API's own id of the mail (its bounce notifications name it).
    pub(super) provider_message_id: Option<&'a str>,
}

/// What this delivery did about the mail, as the request's row records it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Attempt<'a> {
    /// No send was tried (an invalid or throttled request): the attempts
    /// count stays, and so does the throttle.
    None,
    /// The mail server accepted the mail: the throttle is refreshed and the
    /// code's hash stored.
    Sent(Sent<'a>),
    /// A send was tried and no mail went out: it counts as an attempt, and
    /// the throttle is given back.
    Failed,
    /// [`Attempt::Failed`] because the recipient itself was refused for
    /// good; with `SUPPRESS_ON_REJECT` the detail to suppress it with (in
    /// the statement that stores the outcome).
    Rejected(Option<&'a str>),
    /// The address is suppressed: no send was tried, and a throttle slot an
    /// earlier attempt of this request took is given back.
    Suppressed,
}

/// Stores the outcome (`done`) and publishes it; the mark follows the ack.
pub(super) async fn conclude(
    ctx: &Ctx,
    id: &str,
    outcome: &OutcomeEvent,
    attempt: Attempt<'_>,
) -> Result<AfterAck, Failure> {
    let sent = match attempt {
        Attempt::Sent(sent) => Some(sent),
        Attempt::None | Attempt::Failed | Attempt::Rejected(_) | Attempt::Suppressed => None,
    };
    let finish = Finish {
        id,
        outcome_type: outcome.ty,
        outcome: &outcome.bytes,
        sent_at: sent.map(|s| s.at),
        code_hash: sent.and_then(|s| s.code_hash),
        provider_message_id: sent.and_then(|s| s.provider_message_id),
        attempted: !matches!(attempt, Attempt::None | Attempt::Suppressed),
        release_throttle: matches!(
            attempt,
            Attempt::Failed | Attempt::Rejected(_) | Attempt::Suppressed
        ),
        suppress: match attempt {
            Attempt::Rejected(suppress) => suppress,
            _ => None,
        },
    };
    // Retried in place for as long as it takes: a mail may already be out, and
    // handing the delivery back now could send it twice.
    let t = Instant::now();
    // `false` only when another delivery's outcome is stored: our own bytes,
    // committed by a batch this delivery gave up on, count as stored
    // (`BatchedStore::finish`).
    let finished = persist(ctx, "storing the outcome", || ctx.batches.finish(finish)).await?;
    metrics::step("store", t.elapsed());
    if !finished {
        // Our lease ran out and another delivery concluded first: its outcome stands.
        warn!("request concluded by another delivery meanwhile");
        return match Box::pin(persist(ctx, "reading the request", || {
            ctx.store.lookup_and_lease(id)
        }))
        .await?
        {
            Claim::Done(stored) => Box::pin(duplicate(ctx, id, stored)).await,
            Claim::Claimed(_) | Claim::Busy => Ok(None),
        };
    }
    let msg = Outgoing::event(&ctx.topology, outcome.ty, &outcome.id, &outcome.bytes);
    let t = Instant::now();
    publish(ctx, &msg, true).await?;
    metrics::step("publish", t.elapsed());
    metrics::outcome(outcome.label.0, outcome.label.1);
    Ok(Some(Mark::new(id, &outcome.id)))
}

/// Publishes a copy of the delivery to the retry queue of `delay`, through the
/// default exchange, and waits for the broker's confirm.
pub(super) async fn to_retry_queue(
    ctx: &Ctx,
    d: &Delivery,
    id: &str,
    delay: Duration,
    retry: u32,
) -> Result<(), Failure> {
    let queue = ctx.topology.retry_queue(delay);
    let msg = Outgoing {
        exchange: "",
        routing_key: &queue,
        message_id: id,
        kind: Some(VERIFICATION_REQUESTED),
        body: &d.data,
        headers: retry::retry_headers(d.properties.headers().as_ref(), retry),
    };
    publish(ctx, &msg, false).await
}

/// Publishes until the broker confirms, through reconnections, until the
/// shutdown deadline. An outcome no queue is bound for (`unroutable_ok`) is
/// confirmed-and-dropped by design: nobody subscribed to that type, which must
/// not stop the worker.
pub(super) async fn publish(
    ctx: &Ctx,
    msg: &Outgoing<'_>,
    unroutable_ok: bool,
) -> Result<(), Failure> {
    let attempts = (|| ctx.publisher.publish(msg))
        .retry(
            ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times(),
        )
        .when(|e| match e {
            BusError::Cancelled => false,
            // Retried: a retry or dead-letter queue must be there (the
            // topology is declared again on reconnection).
            BusError::Unroutable(_) => !unroutable_ok,
            _ => true,
        })
        .notify(|e, wait| {
            warn!(error = %e, routing_key = msg.routing_key, retry_in = ?wait, "publish failed; retrying");
        });
    let published = tokio::select! {
        published = attempts => published,
        () = ctx.hard_stop.cancelled() => return Err(Failure::Stopped),
    };
    match published {
        Ok(()) => Ok(()),
        Err(BusError::Unroutable(text)) if unroutable_ok => {
            debug!(
                routing_key = msg.routing_key,
                text, "no queue bound for this event type"
            );
            Ok(())
        }
        // Only a shutdown ends the retries with an error: the delivery
        // stays unacknowledged and the broker hands it back.
        Err(_) => Err(Failure::Stopped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verimail_shared::events::VERIFICATION_THROTTLED;

    #[test]
    fn an_outcome_carries_the_requests_trace_and_our_source() -> Result<(), serde_json::Error> {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let outcome = OutcomeEvent::new(
            VERIFICATION_THROTTLED,
            serde_json::json!({}),
            Some(tp.clone()),
        );
        let v: serde_json::Value = serde_json::from_slice(&outcome.bytes)?;
        assert_eq!(v["traceparent"], serde_json::Value::String(tp));
        assert_eq!(v["source"], SOURCE);
        assert_eq!(v["id"], serde_json::Value::String(outcome.id.clone()));
        assert!(v["time"].is_string());
        Ok(())
    }
}
