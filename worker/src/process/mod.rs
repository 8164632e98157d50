//! One delivery, from bytes to acknowledgement: the per-message state machine.
//!
//! ```text
//! decode ─ undecodable ──────────────► dead letter ───────────────────────────► ack
//!        ├ invalid ─► claim ─┬ claimed ─► failed outcome ─┐
//!        └ valid ───► claim ─┤                            │
//!                            ├ busy (live lease elsewhere) ─► retry queue (5 s) ─► ack
//!                            ├ done ─► re-publish the stored outcome if unconfirmed ─► ack
//!                            │         (a replay of its delivery_failed letter reopens it)
//!                            └ claimed ─┬ suppressed address ─► failed/suppressed ─┐
//!                                       ├ throttle refused ─► throttled outcome ─┐
//!                                       └ sign, render, send ─┬ accepted ─► sent ┤
//!                                                 ├ recipient refused ─► failed/recipient_rejected (+ suppressed) ┤
//!                                                 ├ sender/auth/policy refused ─► dead letter + failed/delivery_failed ┤
//!                                                 ├ 4xx, window left ─► retry queue ─► release ─► ack
//!                                                 └ 4xx, window spent ─► dead letter + failed/delivery_failed ┤
//!                                                                                    ▼
//!                                      store outcome (state = done) ─► publish (confirmed) ─► ack ─► mark published
//! ```
//!
//! Every outcome is built once and stored before it is published, so a
//! redelivery re-publishes the very same event (same id) instead of deciding
//! again. Nothing is acknowledged before what it produced is safe. The mark
//! comes after the ack: it only spares a later duplicate of the request a
//! re-publication, so the delivery need not wait for it (see ARCHITECTURE.md,
//! crash window 3).
//!
//! # Rooms
//!
//! This file is the state machine: what happens to a delivery, step by step.
//! [`context`] holds what every delivery shares ([`Ctx`]) and the in-process
//! hold on a request id; `conclude` stores and publishes outcomes and copies
//! to the retry and dead-letter queues; `persist` runs database steps that
//! must not be abandoned, retrying through outages.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, ShortString};
use time::OffsetDateTime;
use tracing::{Span, debug, error, info, instrument, warn};
use verimail_shared::bus::{
    HEADER_REPLAYED, Outgoing, RETRY_DELAYS, dead_letter_headers, header_str,
};
use verimail_shared::events::{
    DecodeError, Echo, FailedData, FailureReason, Policy, RuleBroken, SentData, ThrottledData,
    VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT, VERIFICATION_THROTTLED,
    ValidRequest, decode_request, peek_id,
};
use verimail_shared::telemetry::token_prefix;
use verimail_shared::token::{Claims, Code, TokenFormat};

use crate::mail::{Classification, Envelope, MailContext};
use crate::metrics;
use crate::retry::{self, HEADER_FAILED_OUTCOME};
use crate::store::{Claim, Claimed, Mark, RequestRow, Stored};
use crate::throttle;

mod conclude;
pub mod context;
mod persist;

pub use conclude::mark_after_ack;
pub use context::Ctx;
pub use persist::TAKEOVER_GRACE;

use conclude::{Attempt, OutcomeEvent, Sent, conclude, publish, to_retry_queue};
use context::Holding;
use persist::{claim, claim_with_budget, persist};

/// CloudEvent `source` of every outcome.
pub const SOURCE: &str = "/verimail/worker";
/// In-process retry budget of one send (well inside the lease).
const SEND_BUDGET: Duration = Duration::from_secs(4);
/// What is left to do once the delivery is acknowledged: the published
/// outcome to mark, if any.
pub type AfterAck = Option<Mark>;

/// Why a delivery is not acknowledged. A database outage is not one of
/// them: every step retries in place, holding its message, so an outage
/// spends none of the queue's delivery limit.
#[derive(Debug)]
enum Failure {
    /// The shutdown deadline passed: leave it unacknowledged.
    Stopped,
}

/// Processes one delivery and acknowledges it, or hands it back. Returns
/// the outcome to be marked published once the delivery is
/// acknowledged ([`mark_after_ack`]), if any. `channel` is the one the
/// delivery came on: its acknowledgement goes there.
#[instrument(name = "delivery", skip_all, fields(request_id, user_id, redelivered = delivery.redelivered))]
pub async fn handle(ctx: Arc<Ctx>, channel: Arc<Channel>, delivery: Delivery) -> AfterAck {
    let started = Instant::now();
    match AssertUnwindSafe(process(&ctx, &delivery))
        .catch_unwind()
        .await
    {
        Ok(Ok(after_ack)) => {
            let t = Instant::now();
            if let Err(e) = channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
            {
                // The channel died meanwhile: the broker redelivers and the
                // stored outcome makes that redelivery a no-op.
                debug!(error = %e, "ack failed; the broker will redeliver");
            }
            metrics::step("ack", t.elapsed());
            metrics::processing(started.elapsed());
            return after_ack;
        }
        Ok(Err(Failure::Stopped)) => {
            debug!("shutdown deadline passed; leaving the delivery for the broker");
        }
        Err(_) => {
            // A bug, not an outage: hand the message back after a pause; if
            // it keeps failing, the queue's delivery limit moves it to the
            // dead-letter queue. Without the nack it would stay
            // unacknowledged until the channel closes. Only processing is
            // guarded: a panic after the ack cannot nack an acknowledged tag
            // (the broker would close the channel for it).
            error!("processing panicked; handing the message back");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            if let Err(e) = channel.basic_nack(delivery.delivery_tag, requeue).await {
                debug!(error = %e, "nack failed; the broker will redeliver");
            }
        }
    }
    None
}

async fn process(ctx: &Ctx, d: &Delivery) -> Result<AfterAck, Failure> {
    let policy = Policy {
        return_url_allowlist: &ctx.config.return_url_allowlist,
        single_use_links: ctx.config.token_format == TokenFormat::V1,
    };
    match decode_request(&d.data, policy) {
        Err(DecodeError::Undecodable(detail)) => Box::pin(undecodable(ctx, d, &detail)).await,
        Err(DecodeError::Invalid { echo, failure }) => {
            record_ids(&echo.request_id, echo.user_id.as_deref());
            Box::pin(invalid(ctx, d, &echo, &failure)).await
        }
        Ok(request) => {
            record_ids(&request.id, Some(&request.data.user_id));
            valid(ctx, d, &request).await
        }
    }
}

fn record_ids(request_id: &str, user_id: Option<&str>) {
    let span = Span::current();
    span.record("request_id", request_id);
    if let Some(user_id) = user_id {
        span.record("user_id", user_id);
    }
}

/// Not a CloudEvent: nobody to answer, so the body goes, intact, to `{ns}.dead`.
async fn undecodable(ctx: &Ctx, d: &Delivery, detail: &str) -> Result<AfterAck, Failure> {
    let message_id = d
        .properties
        .message_id()
        .as_ref()
        .map(ToString::to_string)
        .or_else(|| peek_id(&d.data))
        .unwrap_or_default();
    warn!(
        message_id,
        detail, "undecodable message moved to the dead-letter queue"
    );
    let dead = ctx.topology.dead_queue();
    let headers = retry::dead_headers(
        d.properties.headers().as_ref(),
        dead_letter_headers("undecodable", detail),
    );
    let msg = Outgoing {
        exchange: "",
        routing_key: &dead,
        message_id: &message_id,
        kind: d.properties.kind().as_ref().map(ShortString::as_str),
        body: &d.data,
        headers,
    };
    publish(ctx, &msg, false).await?;
    metrics::dead_letter("undecodable");
    Ok(None)
}

/// A CloudEvent that breaks a rule: answered `failed`, recorded like any
/// request so a duplicate id gets the same answer, not a second one.
async fn invalid(
    ctx: &Ctx,
    d: &Delivery,
    echo: &Echo,
    failure: &RuleBroken,
) -> Result<AfterAck, Failure> {
    let id = echo.request_id.as_str();
    let Some(_holding) = Holding::wait_for(ctx, id).await else {
        return defer_busy(ctx, d, id).await;
    };
    let row = RequestRow {
        id,
        user_id: echo.user_id.as_deref(),
        email: echo.email.as_deref(),
        purpose: echo.purpose.map(|p| p.as_str()),
        locale: None,
        return_url: None,
        context: echo.context.as_ref(),
    };
    match claim(ctx, row, None).await? {
        Claim::Busy => defer_busy(ctx, d, id).await,
        Claim::Done(stored) => duplicate(ctx, id, stored).await,
        Claim::Claimed(_) => {
            info!(reason = failure.reason.as_str(), detail = %failure.detail(), "invalid request");
            let data = FailedData {
                fields: echo.outcome_fields(),
                reason: failure.reason,
                detail: failure.detail(),
            };
            let outcome = OutcomeEvent::new(VERIFICATION_FAILED, data, echo.traceparent.clone())
                .counted("failed", failure.reason.as_str());
            conclude(ctx, id, &outcome, Attempt::None).await
        }
    }
}

async fn valid(ctx: &Ctx, d: &Delivery, req: &ValidRequest) -> Result<AfterAck, Failure> {
    let Some(_holding) = Holding::wait_for(ctx, &req.id).await else {
        return Box::pin(defer_busy(ctx, d, &req.id)).await;
    };
    let row = RequestRow {
        id: &req.id,
        user_id: Some(&req.data.user_id),
        email: Some(&req.data.email),
        purpose: Some(req.data.purpose.as_str()),
        locale: req.data.locale.as_deref(),
        return_url: req.data.return_url.as_deref(),
        context: req.data.context.as_ref(),
    };
    let interval = throttle::interval(ctx.config.throttle);
    let claimed = match claim(ctx, row, interval).await? {
        Claim::Claimed(claimed) if claimed.attempts > 0 && is_replay(d) => {
            // A replayed letter of a request still `processing` (its message
            // was dead-lettered by the broker, say at the delivery limit):
            // a fresh attempt with a fresh retry window, as a replayed
            // `delivery_failed` gets.
            info!("replayed request restarted with a fresh retry window");
            persist(ctx, "restarting the retry window", || {
                ctx.store.restart_window(&req.id)
            })
            .await?
            .unwrap_or(claimed)
        }
        Claim::Claimed(claimed) => claimed,
        // The rare paths are boxed (here and below): their futures would
        // otherwise widen every delivery's state machine, copied whole
        // when it is boxed for its task.
        Claim::Busy => return Box::pin(defer_busy(ctx, d, &req.id)).await,
        Claim::Done(stored) => match Box::pin(replay_of(ctx, d, &req.id, &stored)).await? {
            Some(claimed) => claimed,
            None => return Box::pin(duplicate(ctx, &req.id, stored)).await,
        },
    };
    let claimed_at = Instant::now();
    if let Some(reason) = claimed.suppressed {
        // Found by the claim statement itself: no connection, no slot.
        debug!(reason = reason.as_str(), "suppressed");
        let data = FailedData {
            fields: req.echo().outcome_fields(),
            reason: FailureReason::Suppressed,
            detail: format!("the address is on the suppression list: {reason}"),
        };
        let outcome = OutcomeEvent::new(VERIFICATION_FAILED, data, req.traceparent.clone())
            .counted("failed", FailureReason::Suppressed.as_str());
        return conclude(ctx, &req.id, &outcome, Attempt::Suppressed).await;
    }
    if !claimed.throttle_passed {
        let remaining = match interval {
            Some(interval) => {
                persist(ctx, "reading the throttle", || {
                    ctx.store.throttle_remaining(
                        &req.data.user_id,
                        req.data.purpose.as_str(),
                        interval,
                    )
                })
                .await?
            }
            None => None,
        };
        let retry_after_seconds = throttle::retry_after_seconds(remaining);
        // Per message, so debug: the outcome event and the metrics say it.
        debug!(retry_after_seconds, "throttled");
        let data = ThrottledData {
            fields: req.echo().outcome_fields(),
            retry_after_seconds,
        };
        let outcome = OutcomeEvent::new(VERIFICATION_THROTTLED, data, req.traceparent.clone())
            .counted("throttled", "throttled");
        return conclude(ctx, &req.id, &outcome, Attempt::None).await;
    }
    send(ctx, d, req, claimed, claimed_at).await
}

/// Whether the delivery is the first of a `verimail dead replay` copy.
fn is_replay(d: &Delivery) -> bool {
    matches!(
        d.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(HEADER_REPLAYED)),
        Some(AMQPValue::Boolean(true))
    )
}

/// A replayed dead letter (it carries the id of the `delivery_failed` outcome
/// it was dead-lettered with, and that outcome is still the stored one) makes
/// the request new again: fresh attempt, fresh retry window.
async fn replay_of(
    ctx: &Ctx,
    d: &Delivery,
    id: &str,
    stored: &Stored,
) -> Result<Option<Claimed>, Failure> {
    let Some(failed_outcome) = header_str(d.properties.headers().as_ref(), HEADER_FAILED_OUTCOME)
    else {
        return Ok(None);
    };
    let stored_id = stored.outcome.as_deref().and_then(peek_id);
    if stored.outcome_type.as_deref() != Some(VERIFICATION_FAILED)
        || stored_id.as_deref() != Some(failed_outcome.as_str())
    {
        return Ok(None);
    }
    let reopened = claim_with_budget(ctx, || ctx.store.reopen(id, &failed_outcome)).await?;
    if reopened.is_some() {
        info!(
            failed_outcome,
            "replayed request reopened for a new attempt"
        );
    }
    Ok(reopened)
}

/// Signs, renders and sends; then concludes, retries later or gives up.
async fn send(
    ctx: &Ctx,
    d: &Delivery,
    req: &ValidRequest,
    claimed: Claimed,
    claimed_at: Instant,
) -> Result<AfterAck, Failure> {
    let config = &ctx.config;
    let now = OffsetDateTime::now_utc();
    // Tokens carry whole seconds: the outcome's expires_at says what the token says.
    let issued_at = now.replace_nanosecond(0).unwrap_or(now);
    let expires_at = issued_at + config.token_ttl;
    // The link, unless the mail carries only a code (CONFIRM_METHOD=code).
    let link = config.confirm_method.mails_link().then(|| {
        let token = match config.token_format {
            TokenFormat::V1 => ctx.signer.mint_v1(&Claims {
                request_id: req.id.clone(),
                user_id: req.data.user_id.clone(),
                email: req.data.email.clone(),
                purpose: req.data.purpose.as_str().to_owned(),
                locale: req.data.locale.clone(),
                issued_at,
                expires_at,
            }),
            TokenFormat::Itsdangerous => ctx.signer.mint_itsdangerous(&req.data.email, issued_at),
        };
        debug!(token = %token_prefix(&token), "link minted");
        config.confirm_link(&token)
    });
    // A fresh code for every mail that goes out: only its keyed hash is
    // stored, with the mail's `sent_at` (conclude), so the code that works is
    // always the one in the mail recorded last. A redelivered copy of a
    // concluded request never gets here (it re-publishes the stored outcome),
    // so it mails no second code. The code itself is never logged.
    let code = config
        .confirm_method
        .mails_code()
        .then(|| Code::generate(config.code_length));
    let code_hash = code
        .as_ref()
        .map(|c| ctx.signer.code_hash(&req.id, c.digits()));
    let mail_context = MailContext {
        name: req.data.name.as_deref(),
        email: &req.data.email,
        link: link.as_deref(),
        code: code.as_ref().map(Code::digits),
        purpose: req.data.purpose,
        expires_at,
        ttl: config.token_ttl,
    };
    let mail = match ctx
        .templates
        .render(req.data.locale.as_deref(), &mail_context)
    {
        Ok(mail) => mail,
        Err(e) => {
            // Templates were checked at start, so this is a bug or a broken
            // override: dead-letter the request so it can be replayed once fixed.
            warn!(error = %e, "rendering failed");
            return Box::pin(give_up(ctx, d, req, &format!("rendering failed: {e}"))).await;
        }
    };

    let window = config.mail_retry_window;
    let remaining = window.saturating_sub(claimed.elapsed + claimed_at.elapsed());
    let envelope = Envelope {
        to_name: req.data.name.as_deref(),
        to_email: &req.data.email,
        request_id: &req.id,
    };
    let started = Instant::now();
    let result = ctx
        .mailer
        .send_with_backoff(&envelope, &mail, SEND_BUDGET.min(remaining))
        .await;
    let took = started.elapsed();
    match result {
        Ok(provider_message_id) => {
            metrics::smtp(took, "accepted");
            let sent_at = OffsetDateTime::now_utc();
            // Per message, so debug: at thousands of mails a second an info
            // line each would cost more than the send (the metrics count them).
            debug!(smtp_ms = took.as_millis(), "mail sent");
            let data = SentData {
                fields: req.echo().outcome_fields(),
                sent_at,
                expires_at,
            };
            let outcome = OutcomeEvent::new(VERIFICATION_SENT, data, req.traceparent.clone())
                .counted("sent", "");
            let sent = Sent {
                at: sent_at,
                code_hash: code_hash.as_deref(),
                provider_message_id: provider_message_id.as_deref(),
            };
            conclude(ctx, &req.id, &outcome, Attempt::Sent(sent)).await
        }
        Err(e) if e.classification() == Classification::RecipientRejected => {
            metrics::smtp(took, "rejected");
            warn!(error = %e, "recipient rejected");
            let data = FailedData {
                fields: req.echo().outcome_fields(),
                reason: FailureReason::RecipientRejected,
                detail: e.to_string(),
            };
            let outcome = OutcomeEvent::new(VERIFICATION_FAILED, data, req.traceparent.clone())
                .counted("failed", FailureReason::RecipientRejected.as_str());
            // SUPPRESS_ON_REJECT: the same statement that stores the outcome
            // puts the address on the list.
            let detail = e.to_string();
            let suppress = ctx.config.suppress_on_reject.then_some(detail.as_str());
            conclude(ctx, &req.id, &outcome, Attempt::Rejected(suppress)).await
        }
        Err(e) if e.classification() == Classification::ProviderRejected => {
            // An HTTP API refused the mail for good (a 4xx other than 429):
            // its words in the detail; no retry can change its answer.
            metrics::smtp(took, "provider_rejected");
            warn!(error = %e, "mail refused by the provider's API");
            let data = FailedData {
                fields: req.echo().outcome_fields(),
                reason: FailureReason::ProviderRejected,
                detail: e.to_string(),
            };
            let outcome = OutcomeEvent::new(VERIFICATION_FAILED, data, req.traceparent.clone())
                .counted("failed", FailureReason::ProviderRejected.as_str());
            conclude(ctx, &req.id, &outcome, Attempt::Failed).await
        }
        Err(e) if matches!(e.classification(), Classification::Refused(_)) => {
            // The server refuses us (sender, credentials, policy), not the
            // recipient: no retry can pass before an operator acts, so the
            // request is dead-lettered for replay at once.
            metrics::smtp(took, "refused");
            warn!(error = %e, "delivery refused by the SMTP server");
            Box::pin(give_up(ctx, d, req, &e.detail())).await
        }
        Err(e) => {
            metrics::smtp(took, "transient");
            let elapsed = claimed.elapsed + claimed_at.elapsed();
            if elapsed >= window {
                warn!(error = %e, elapsed_s = elapsed.as_secs(), "transient failures past the retry window");
                return Box::pin(give_up(ctx, d, req, &e.to_string())).await;
            }
            let attempts = u32::try_from(claimed.attempts).unwrap_or(0) + 1;
            let delay = retry::retry_delay(attempts, window - elapsed);
            warn!(error = %e, attempts, retry_in_s = delay.as_secs(), "delivery failed; retrying later");
            let retry = retry::retry_count(d.properties.headers().as_ref()) + 1;
            Box::pin(to_retry_queue(ctx, d, &req.id, delay, retry)).await?;
            Box::pin(persist(ctx, "releasing the request", || {
                ctx.store.release_for_retry(&req.id)
            }))
            .await?;
            metrics::retry();
            Ok(None)
        }
    }
}

/// Transient failures outlasted the retry window: `failed`/`delivery_failed`,
/// and a copy of the request in `{ns}.dead` for `verimail dead replay`.
async fn give_up(
    ctx: &Ctx,
    d: &Delivery,
    req: &ValidRequest,
    detail: &str,
) -> Result<AfterAck, Failure> {
    let data = FailedData {
        fields: req.echo().outcome_fields(),
        reason: FailureReason::DeliveryFailed,
        detail: detail.to_owned(),
    };
    let outcome = OutcomeEvent::new(VERIFICATION_FAILED, data, req.traceparent.clone())
        .counted("failed", FailureReason::DeliveryFailed.as_str());
    // The letter goes first: once the outcome is stored, a redelivery only
    // re-publishes it, so a letter published after it could be lost.
    let mut extra = dead_letter_headers(FailureReason::DeliveryFailed.as_str(), detail);
    extra.insert(
        ShortString::from(HEADER_FAILED_OUTCOME),
        AMQPValue::LongString(outcome.id.as_str().into()),
    );
    let dead = ctx.topology.dead_queue();
    let msg = Outgoing {
        exchange: "",
        routing_key: &dead,
        message_id: &req.id,
        kind: Some(VERIFICATION_REQUESTED),
        body: &d.data,
        headers: retry::dead_headers(d.properties.headers().as_ref(), extra),
    };
    publish(ctx, &msg, false).await?;
    metrics::dead_letter(FailureReason::DeliveryFailed.as_str());
    conclude(ctx, &req.id, &outcome, Attempt::Failed).await
}

/// Another delivery of the same id holds a live lease: look again later.
/// Never a second mail: the holder finishes it, or its lease runs out.
async fn defer_busy(ctx: &Ctx, d: &Delivery, id: &str) -> Result<AfterAck, Failure> {
    metrics::duplicate("in_hand");
    info!("request in hand elsewhere; looking again later");
    let retry = retry::retry_count(d.properties.headers().as_ref());
    to_retry_queue(ctx, d, id, RETRY_DELAYS[0], retry).await?;
    Ok(None)
}

/// The request already has an outcome: publish it again only if the broker
/// never confirmed it (same event id, so subscribers see one outcome).
async fn duplicate(ctx: &Ctx, id: &str, stored: Stored) -> Result<AfterAck, Failure> {
    metrics::duplicate("done");
    if stored.published {
        info!("duplicate of a finished request; nothing to do");
        return Ok(None);
    }
    let (Some(ty), Some(bytes)) = (stored.outcome_type, stored.outcome) else {
        warn!("finished request without a stored outcome");
        return Ok(None);
    };
    let outcome_id = peek_id(&bytes).unwrap_or_default();
    info!(outcome_id, "re-publishing the stored outcome");
    let msg = Outgoing::event(&ctx.topology, &ty, &outcome_id, &bytes);
    publish(ctx, &msg, true).await?;
    Ok(Some(Mark::new(id, &outcome_id)))
}
