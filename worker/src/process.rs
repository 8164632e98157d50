//! One delivery, from bytes to acknowledgement: the per-message state machine.
//!
//! ```text
//! decode ─ undecodable ──────────────► dead letter ───────────────────────────► ack
//!        ├ invalid ─► claim ─┬ claimed ─► failed outcome ─┐
//!        └ valid ───► claim ─┤                            │
//!                            ├ busy (live lease elsewhere) ─► retry queue (5 s) ─► ack
//!                            ├ done ─► re-publish the stored outcome if unconfirmed ─► ack
//!                            │         (a replay of its delivery_failed letter reopens it)
//!                            └ claimed ─┬ throttle refused ─► throttled outcome ─┐
//!                                       └ sign, render, send ─┬ accepted ─► sent ┤
//!                                                 ├ recipient refused ─► failed/recipient_rejected ┤
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

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, ShortString};
use serde::Serialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info, instrument, warn};
use verimail_shared::bus::{
    BusError, HEADER_REPLAYED, Outgoing, Publisher, RETRY_DELAYS, Topology, dead_letter_headers,
    header_str,
};
use verimail_shared::config::Config;
use verimail_shared::events::{
    CloudEvent, DecodeError, Echo, FailedData, FailureReason, Policy, RuleBroken, SentData,
    ThrottledData, VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT,
    VERIFICATION_THROTTLED, ValidRequest, decode_request, peek_id,
};
use verimail_shared::telemetry::token_prefix;
use verimail_shared::token::{Claims, Code, Signer, TokenFormat};

use crate::health::Health;
use crate::mail::{Classification, Envelope, MailContext, Mailer, Templates};
use crate::metrics;
use crate::retry::{self, HEADER_FAILED_OUTCOME};
use crate::store::{Batches, Claim, Claimed, Finish, RequestRow, Store, Stored};
use crate::throttle;

/// CloudEvent `source` of every outcome.
pub const SOURCE: &str = "/verimail/worker";
/// In-process retry budget of one send (well inside the lease).
const SEND_BUDGET: Duration = Duration::from_secs(4);
/// Longest one database step may take, ours: a batched call (at most 8 s)
/// and then its statement alone (a 5 s statement timeout, a 3 s wait for a
/// connection), with room to spare.
const STEP_DEADLINE: Duration = Duration::from_secs(20);
/// Longest pause between two database attempts.
const MAX_DB_BACKOFF: Duration = Duration::from_secs(5);
/// How long after its own last database failure a worker leaves expired
/// leases alone: every worker saw the outage (the readiness probe asks each
/// second), and a live holder stores its outcome within one backoff
/// ([`MAX_DB_BACKOFF`]) of the database's return, well inside this.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(20);

/// What every delivery task shares.
#[derive(Debug)]
pub struct Ctx {
    /// The configuration.
    pub config: Config,
    /// Names of exchange and queues.
    pub topology: Topology,
    /// The worker's tables.
    pub store: Store,
    /// Batched claims, conclusions and `outcome_published` marks.
    pub batches: Batches,
    /// Confirmed publishing.
    pub publisher: Publisher,
    /// Mail templates.
    pub templates: Templates,
    /// Mail transport.
    pub mailer: Mailer,
    /// Token minting.
    pub signer: Signer,
    /// Readiness.
    pub health: Arc<Health>,
    /// Cancelled when in-flight work must stop (the shutdown deadline passed):
    /// tasks then leave their delivery unacknowledged for the broker to hand back.
    pub hard_stop: CancellationToken,
    /// Request ids a delivery of this process holds right now: a copy of one
    /// (redelivered, or published twice) is never claimed beside it, even
    /// once the lease ran out during a database outage.
    pub in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A request id held in [`Ctx::in_flight`] until dropped.
struct Holding<'a> {
    ctx: &'a Ctx,
    id: String,
}

impl<'a> Holding<'a> {
    /// Holds `id`, or `None` when another delivery of this process holds it.
    fn take(ctx: &'a Ctx, id: &str) -> Option<Self> {
        let mut held = ctx
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.insert(id.to_owned()).then(|| Self {
            ctx,
            id: id.to_owned(),
        })
    }
}

impl<'a> Holding<'a> {
    /// Holds `id`, waiting up to [`HOLD_WAIT`] for another delivery of this
    /// process to let go of it (a copy that found the request finished is
    /// done in milliseconds); `None` when it still holds it (it is sending).
    async fn wait_for(ctx: &'a Ctx, id: &str) -> Option<Self> {
        let deadline = Instant::now() + HOLD_WAIT;
        loop {
            if let Some(holding) = Self::take(ctx, id) {
                return Some(holding);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// How long a copy of a request waits for another delivery of this process
/// to let go of it before it goes to the retry queue.
const HOLD_WAIT: Duration = Duration::from_secs(1);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.ctx
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// What is left to do once the delivery is acknowledged: the request whose
/// published outcome to mark, if any.
pub type AfterAck = Option<String>;

/// Why a delivery is not acknowledged. A database outage is not one of
/// them: every step retries in place, holding its message, so an outage
/// spends none of the queue's delivery limit.
#[derive(Debug)]
enum Failure {
    /// The shutdown deadline passed: leave it unacknowledged.
    Stopped,
}

/// Processes one delivery and acknowledges it, or hands it back. Returns
/// the request whose outcome is to be marked published once the delivery is
/// acknowledged ([`mark_after_ack`]), if any.
#[instrument(name = "delivery", skip_all, fields(request_id, user_id, redelivered = delivery.redelivered))]
pub async fn handle(ctx: Arc<Ctx>, delivery: Delivery) -> AfterAck {
    let started = Instant::now();
    match process(&ctx, &delivery).await {
        Ok(after_ack) => {
            let t = Instant::now();
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                // The channel died meanwhile: the broker redelivers and the
                // stored outcome makes that redelivery a no-op.
                debug!(error = %e, "ack failed; the broker will redeliver");
            }
            metrics::step("ack", t.elapsed());
            metrics::processing(started.elapsed());
            return after_ack;
        }
        Err(Failure::Stopped) => {
            debug!("shutdown deadline passed; leaving the delivery for the broker");
        }
    }
    None
}

/// Records that the outcome of request `id` was confirmed, after its delivery
/// was acknowledged: the delivery's prefetch slot is free by then. Only the
/// shutdown deadline stops it (the write is retried); then a later duplicate
/// re-publishes the same event (ARCHITECTURE.md, crash window 3).
#[instrument(name = "mark", skip_all, fields(request_id = id))]
pub async fn mark_after_ack(ctx: &Ctx, id: &str) {
    let t = Instant::now();
    let _ = mark_published(ctx, id).await;
    metrics::step("mark", t.elapsed());
}

/// Exponential backoff with jitter after `n` earlier failures, at most 5 s.
fn backoff(n: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(2u32.saturating_pow(n.min(5)));
    let capped = base.min(MAX_DB_BACKOFF);
    let jitter = rand::random_range(0.5..1.0);
    capped.mul_f64(jitter)
}

async fn process(ctx: &Ctx, d: &Delivery) -> Result<AfterAck, Failure> {
    let policy = Policy {
        return_url_allowlist: &ctx.config.return_url_allowlist,
        single_use_links: ctx.config.token_format == TokenFormat::V1,
    };
    match decode_request(&d.data, policy) {
        Err(DecodeError::Undecodable(detail)) => undecodable(ctx, d, &detail).await,
        Err(DecodeError::Invalid { echo, failure }) => {
            record_ids(&echo.request_id, echo.user_id.as_deref());
            invalid(ctx, d, &echo, &failure).await
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
            let outcome = Outcome::new(VERIFICATION_FAILED, data, echo.traceparent.clone())
                .counted("failed", failure.reason.as_str());
            conclude(ctx, id, &outcome, None, false, false).await
        }
    }
}

async fn valid(ctx: &Ctx, d: &Delivery, req: &ValidRequest) -> Result<AfterAck, Failure> {
    let Some(_holding) = Holding::wait_for(ctx, &req.id).await else {
        return defer_busy(ctx, d, &req.id).await;
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
        Claim::Busy => return defer_busy(ctx, d, &req.id).await,
        Claim::Done(stored) => match replay_of(ctx, d, &req.id, &stored).await? {
            Some(claimed) => claimed,
            None => return duplicate(ctx, &req.id, stored).await,
        },
    };
    let claimed_at = Instant::now();
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
        let outcome = Outcome::new(VERIFICATION_THROTTLED, data, req.traceparent.clone())
            .counted("throttled", "throttled");
        return conclude(ctx, &req.id, &outcome, None, false, false).await;
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
            return give_up(ctx, d, req, &format!("rendering failed: {e}")).await;
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
        Ok(()) => {
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
            let outcome =
                Outcome::new(VERIFICATION_SENT, data, req.traceparent.clone()).counted("sent", "");
            let sent = Sent {
                at: sent_at,
                code_hash: code_hash.as_deref(),
            };
            conclude(ctx, &req.id, &outcome, Some(sent), true, false).await
        }
        Err(e) if e.classification() == Classification::RecipientRejected => {
            metrics::smtp(took, "rejected");
            warn!(error = %e, "recipient rejected");
            let data = FailedData {
                fields: req.echo().outcome_fields(),
                reason: FailureReason::RecipientRejected,
                detail: e.to_string(),
            };
            let outcome = Outcome::new(VERIFICATION_FAILED, data, req.traceparent.clone())
                .counted("failed", FailureReason::RecipientRejected.as_str());
            conclude(ctx, &req.id, &outcome, None, true, true).await
        }
        Err(e) if matches!(e.classification(), Classification::Refused(_)) => {
            // The server refuses us (sender, credentials, policy), not the
            // recipient: no retry can pass before an operator acts, so the
            // request is dead-lettered for replay at once.
            metrics::smtp(took, "refused");
            warn!(error = %e, "delivery refused by the SMTP server");
            give_up(ctx, d, req, &e.detail()).await
        }
        Err(e) => {
            metrics::smtp(took, "transient");
            let elapsed = claimed.elapsed + claimed_at.elapsed();
            if elapsed >= window {
                warn!(error = %e, elapsed_s = elapsed.as_secs(), "transient failures past the retry window");
                return give_up(ctx, d, req, &e.to_string()).await;
            }
            let attempts = u32::try_from(claimed.attempts).unwrap_or(0) + 1;
            let delay = retry::retry_delay(attempts, window - elapsed);
            warn!(error = %e, attempts, retry_in_s = delay.as_secs(), "delivery failed; retrying later");
            let retry = retry::retry_count(d.properties.headers().as_ref()) + 1;
            to_retry_queue(ctx, d, &req.id, delay, retry).await?;
            persist(ctx, "releasing the request", || {
                ctx.store.release_for_retry(&req.id)
            })
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
    let outcome = Outcome::new(VERIFICATION_FAILED, data, req.traceparent.clone())
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
    conclude(ctx, &req.id, &outcome, None, true, true).await
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
    Ok(Some(id.to_owned()))
}

/// Records that the broker confirmed the outcome (batched with other
/// deliveries' conclusions; alone, with retries, when that batch failed).
async fn mark_published(ctx: &Ctx, id: &str) -> Result<(), Failure> {
    persist(ctx, "marking the outcome published", || {
        ctx.batches.mark_published(id)
    })
    .await
}

/// An outcome event, built once.
struct Outcome {
    id: String,
    ty: &'static str,
    bytes: Vec<u8>,
    label: (&'static str, &'static str),
}

impl Outcome {
    fn new<T: Serialize>(ty: &'static str, data: T, traceparent: Option<String>) -> Self {
        let mut event = CloudEvent::new(ty, SOURCE, data);
        event.traceparent = traceparent;
        Self {
            id: event.id.clone(),
            ty,
            bytes: event.to_bytes(),
            label: ("", ""),
        }
    }

    fn counted(mut self, outcome: &'static str, reason: &'static str) -> Self {
        self.label = (outcome, reason);
        self
    }
}

/// A mail the SMTP server accepted: when, and the keyed hash of its code.
#[derive(Debug, Clone, Copy)]
struct Sent<'a> {
    at: OffsetDateTime,
    code_hash: Option<&'a [u8]>,
}

/// Stores the outcome (`done`) and publishes it; the mark follows the ack.
async fn conclude(
    ctx: &Ctx,
    id: &str,
    outcome: &Outcome,
    sent: Option<Sent<'_>>,
    attempted: bool,
    release_throttle: bool,
) -> Result<AfterAck, Failure> {
    let finish = Finish {
        id,
        outcome_type: outcome.ty,
        outcome: &outcome.bytes,
        sent_at: sent.map(|s| s.at),
        code_hash: sent.and_then(|s| s.code_hash),
        attempted,
        release_throttle,
    };
    // Retried in place for as long as it takes: a mail may already be out, and
    // handing the delivery back now could send it twice.
    let t = Instant::now();
    let mut finished = persist(ctx, "storing the outcome", || ctx.batches.finish(finish)).await?;
    if !finished {
        // A batch this delivery gave up on (its deadline passed) may have
        // committed our outcome meanwhile: the statement alone, on a fresh
        // snapshot, recognises our own bytes.
        finished = persist(ctx, "storing the outcome", || ctx.store.finish(finish)).await?;
    }
    metrics::step("store", t.elapsed());
    if !finished {
        // Our lease ran out and another delivery concluded first: its outcome stands.
        warn!("request concluded by another delivery meanwhile");
        return match persist(ctx, "reading the request", || ctx.store.lookup(id)).await? {
            Claim::Done(stored) => duplicate(ctx, id, stored).await,
            Claim::Claimed(_) | Claim::Busy => Ok(None),
        };
    }
    let msg = Outgoing::event(&ctx.topology, outcome.ty, &outcome.id, &outcome.bytes);
    let t = Instant::now();
    publish(ctx, &msg, true).await?;
    metrics::step("publish", t.elapsed());
    metrics::outcome(outcome.label.0, outcome.label.1);
    Ok(Some(id.to_owned()))
}

/// Publishes a copy of the delivery to the retry queue of `delay`, through the
/// default exchange, and waits for the broker's confirm.
async fn to_retry_queue(
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
async fn publish(ctx: &Ctx, msg: &Outgoing<'_>, unroutable_ok: bool) -> Result<(), Failure> {
    let mut wait = Duration::from_millis(100);
    loop {
        match ctx.publisher.publish(msg).await {
            Ok(()) => return Ok(()),
            Err(BusError::Unroutable(text)) if unroutable_ok => {
                debug!(
                    routing_key = msg.routing_key,
                    text, "no queue bound for this event type"
                );
                return Ok(());
            }
            Err(BusError::Cancelled) => return Err(Failure::Stopped),
            Err(e) => {
                warn!(error = %e, routing_key = msg.routing_key, retry_in = ?wait, "publish failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = ctx.hard_stop.cancelled() => return Err(Failure::Stopped),
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Claims, retrying in place (backoff up to 5 s) for as long as the database
/// is down, holding the message: a nack would count towards the queue's
/// delivery limit, and a long outage would dead-letter requests.
async fn claim(
    ctx: &Ctx,
    row: RequestRow<'_>,
    interval: Option<Duration>,
) -> Result<Claim, Failure> {
    let t = Instant::now();
    let claim = claim_with_budget(ctx, || {
        // Just back from an outage, a lease that ran out during it may be a
        // live worker's that could not store its outcome yet: not taken over
        // before the grace has passed (ARCHITECTURE.md, crash window 1).
        let takeover = ctx.health.since_db_failure() >= TAKEOVER_GRACE;
        ctx.batches.claim(row, interval, takeover)
    })
    .await;
    metrics::step("claim", t.elapsed());
    claim
}

async fn claim_with_budget<T, F, Fut>(ctx: &Ctx, mut op: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut n = 0;
    loop {
        match bounded(op()).await {
            Ok(v) => {
                ctx.health.set_db(true);
                return Ok(v);
            }
            Err(e) => {
                metrics::db_error();
                ctx.health.set_db(false);
                let wait = backoff(n);
                n += 1;
                debug!(error = %e, retry_in = ?wait, "claim failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = ctx.hard_stop.cancelled() => return Err(Failure::Stopped),
                }
            }
        }
    }
}

/// One database step under a deadline of our own: the server's statement
/// timeout cannot end a statement whose socket stopped answering (a
/// half-open connection), so past [`STEP_DEADLINE`] the step is dropped, its
/// connection with it, and retried like any failure.
async fn bounded<T>(step: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
    tokio::time::timeout(STEP_DEADLINE, step)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer from PostgreSQL in time",
            )))
        })
}

/// Runs a database step that must not be abandoned (a decision was made, a
/// mail may be out) until it succeeds or the shutdown deadline passes.
async fn persist<T, F, Fut>(ctx: &Ctx, what: &'static str, mut op: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut n = 0;
    loop {
        match bounded(op()).await {
            Ok(v) => return Ok(v),
            Err(e) => {
                ctx.health.set_db(false);
                let wait = backoff(n);
                n += 1;
                warn!(error = %e, what, retry_in = ?wait, "database failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = ctx.hard_stop.cancelled() => return Err(Failure::Stopped),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff(0) <= Duration::from_millis(250));
        assert!(backoff(0) >= Duration::from_millis(125));
        for n in 0..40 {
            assert!(backoff(n) <= MAX_DB_BACKOFF);
        }
        assert!(backoff(10) >= MAX_DB_BACKOFF / 2);
    }

    #[test]
    fn an_outcome_carries_the_requests_trace_and_our_source() -> Result<(), serde_json::Error> {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let outcome = Outcome::new(
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
