//! The consumer loop: deliveries from `{ns}.worker`, each processed in its own
//! task, at most `WORKER_CONCURRENCY` at once; a lost channel is replaced and
//! consumption resumes.

use std::sync::Arc;

use backon::Retryable;
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use verimail_shared::bus::{Bus, BusError, SETUP_TIMEOUT, reconnect_backoff};

use verimail_shared::bus::declare;

use crate::process::{self, Ctx};

/// Consumes until `shutdown`, spawning one task per delivery into `tracker`.
/// Returns the last channel, cancelled but open: in-flight tasks still ack on
/// it, and closing it afterwards hands back whatever was not acknowledged.
pub async fn consume(
    ctx: Arc<Ctx>,
    bus: Arc<Bus>,
    prefetch: u16,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Option<Channel> {
    let tag = format!("verimail-worker-{}", uuid::Uuid::now_v7());
    // The broker never has more than `prefetch` unacknowledged deliveries on a
    // channel, but tasks from a lost channel may still run: the semaphore keeps
    // the total bounded across reconnections too. A task gives its permit
    // back at the ack, before it marks its outcome published, so the delivery
    // the broker sends for that ack does not wait for the mark.
    let permits = Arc::new(Semaphore::new(usize::from(prefetch)));
    while !shutdown.is_cancelled() {
        // Channel and consumer again, for as long as the broker refuses them;
        // each failure marks the worker unready until one succeeds.
        // Bounded, as every wait on the broker: a start that hangs (a
        // channel or consumer never answered on a fresh connection) is given
        // up, its connection forgotten, and retried on a new one.
        let attempts = (|| {
            bus.within(
                "starting the consumer",
                SETUP_TIMEOUT,
                start(&ctx, &bus, prefetch, &tag),
            )
        })
        .retry(reconnect_backoff())
        .when(|e| !matches!(e, BusError::Cancelled))
        .notify(|e, wait| {
            ctx.health.set_bus(false);
            warn!(error = %e, retry_in = ?wait, "cannot consume; retrying");
        });
        let started = tokio::select! {
            started = attempts => started,
            () = shutdown.cancelled() => break,
        };
        // Only a cancelled bus ends the retries with an error.
        let Ok((channel, mut consumer)) = started else {
            break;
        };
        info!(queue = %consumer.queue(), prefetch, "consuming");
        // Deliveries are acknowledged on this channel directly rather than
        // through their `Acker`, which hands each ack to lapin's internal
        // task, which spawns a task of its own to send it: two task hops, a
        // spawn and a second promise per mail (docs/performance.md). No
        // recovery is configured, so a lost channel stays closed and an ack
        // on it fails, as the `Acker`'s would. The tasks' handles keep the
        // channel open until the last of them is done: deliveries still in
        // hand when the consumer is lost are acknowledged where they came
        // from rather than redelivered.
        let acks = Arc::new(channel.clone());
        loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Some(cancel(channel, &tag).await),
                permit = permits.clone().acquire_owned() => permit,
            };
            // The semaphore is never closed.
            let Ok(permit) = permit else { break };
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Some(cancel(channel, &tag).await),
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    // Boxed: the state machine of one delivery is large, and
                    // unboxed it was copied whole on each move into the task
                    // (it showed in the profile as memmove).
                    let handling = Box::pin(process::handle(ctx.clone(), acks.clone(), delivery));
                    tracker.spawn(async move {
                        let after_ack = handling.await;
                        drop(permit);
                        if let Some(mark) = after_ack {
                            // Boxed too: inline, its state would make the
                            // spawned task, copied at the spawn, kilobytes larger.
                            Box::pin(process::mark_after_ack(&ctx, &mark)).await;
                        }
                    });
                }
                Some(Err(e)) => {
                    ctx.health.set_bus(false);
                    warn!(error = %e, "consumer failed; reconnecting");
                    break;
                }
                None => {
                    warn!("consumer cancelled by the broker; reconnecting");
                    break;
                }
            }
        }
    }
    None
}

/// A fresh channel with prefetch set, the topology declared (a broker that
/// lost it gets it back) and a consumer on the worker queue.
async fn start(
    ctx: &Ctx,
    bus: &Bus,
    prefetch: u16,
    tag: &str,
) -> Result<(Channel, Consumer), BusError> {
    let channel = bus.channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    declare(&channel, &ctx.topology).await?;
    let consumer = channel
        .basic_consume(
            ctx.topology.worker_queue().as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    ctx.health.set_bus(true);
    Ok((channel, consumer))
}

/// Stops deliveries (basic.cancel) but keeps the channel for pending acks.
async fn cancel(channel: Channel, tag: &str) -> Channel {
    info!("stopping consumption");
    if let Err(e) = channel
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await
    {
        warn!(error = %e, "basic.cancel failed");
    }
    channel
}
