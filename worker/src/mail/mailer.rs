//! [`Mailer`]: the targets `MAIL_URL` names, tried in order; one deadline
//! per attempt; in-process retries of transient failures with backoff; the
//! namespace's pauses and send budget.
//!
//! Every attempt runs under a deadline ([`ATTEMPT_TIMEOUT`]): lettre applies
//! its own timeout to the TCP connect only, and a server that accepts and then
//! stops answering must not hold a worker's slot forever (see [`super::smtp`]
//! for why a timed-out SMTP connection is never reused).
//!
//! Failover: a transient failure of one target sends that mail through the
//! next (a permanent refusal does not: another provider would not change the
//! recipient). A target that just failed is tried after the others for
//! [`DOWN_FOR`], then first again, so a target that comes back is used again.
//! A paused target ([`super::pause`]) is skipped; when every target is
//! paused the mail waits, within its budget.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use lettre::address::AddressError;
use sqlx::PgPool;
use tracing::{debug, warn};
use verimail_shared::config::{Config, MailUrl};

use super::http::{ApiMail, ApiTransport};
use super::message::{Composed, Composer};
use super::outbox::write_outbox;
use super::pace::Pace;
use super::pause::Pauses;
use super::smtp::SmtpPool;
use super::{Classification, Envelope, RenderedMail, SendError, classify, pause_for};

/// Longest a single delivery attempt may take, connection included. Long
/// enough for a slow server's reply to the message (content scanning), short
/// enough that a stuck one frees the worker's slot.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// First delay between in-process attempts; it doubles, with jitter, up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between in-process attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a target of a failover list that failed transiently is tried
/// after the others.
pub const DOWN_FOR: Duration = Duration::from_secs(1);

/// Histogram of single attempts, seconds, by `result`.
pub const ATTEMPT_SECONDS: &str = "verimail_worker_smtp_attempt_seconds";
/// Counter of attempts by `result` (`sent`, `transient`, `permanent`) and `target`.
pub const ATTEMPTS: &str = "verimail_worker_smtp_attempts_total";

/// A mailer could not be built from `MAIL_URL`/`MAIL_FROM`.
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    /// `MAIL_FROM` is not a mailbox lettre accepts.
    #[error("MAIL_FROM: `{value}` is not a mailbox ({source})")]
    From {
        /// The configured value.
        value: String,
        /// lettre's complaint.
        #[source]
        source: AddressError,
    },
    /// The `file://` outbox folder could not be created.
    #[error("MAIL_URL: cannot create the outbox folder {}: {source}", dir.display())]
    Outbox {
        /// The folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS parameters could not be built for the host.
    #[error("MAIL_URL: TLS set-up for `{host}` failed: {source}")]
    Tls {
        /// The SMTP host.
        host: String,
        /// lettre's error.
        #[source]
        source: lettre::transport::smtp::Error,
    },
    /// An API's base URL is not one.
    #[error("MAIL_URL: `{url}` is not a URL ({source})")]
    Endpoint {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: url::ParseError,
    },
    /// The generic target signs with `VERIMAIL_SECRET_KEY`, which is unset.
    #[error(
        "MAIL_URL: an https:// or http:// target signs its requests with VERIMAIL_SECRET_KEY, which is not set"
    )]
    NoSecretKey,
    /// `ses://` needs AWS credentials in the environment.
    #[error("{0}: not set, and MAIL_URL is ses:// (SES requests are signed with it)")]
    AwsCredentials(&'static str),
    /// The HTTP client could not be built (no TLS roots, say).
    #[error("MAIL_URL: the HTTP client could not be built: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// Delivers mail through the targets of `MAIL_URL`.
#[derive(Debug, Clone)]
pub struct Mailer {
    composer: Composer,
    targets: Arc<[Target]>,
    attempt_timeout: Duration,
    pauses: Arc<Pauses>,
    pace: Option<Arc<Pace>>,
    attempt_seconds: Arc<AttemptSeconds>,
}

/// [`ATTEMPT_SECONDS`] by result, each registered at its first attempt (the
/// macro builds its key and looks it up in the recorder's registry at every
/// call; registered before, a result no attempt had would show as a series).
#[derive(Debug, Default)]
struct AttemptSeconds {
    sent: OnceLock<metrics::Histogram>,
    transient: OnceLock<metrics::Histogram>,
    permanent: OnceLock<metrics::Histogram>,
}

/// One target of `MAIL_URL`.
#[derive(Debug)]
struct Target {
    transport: Transport,
    /// Names it in pauses, metrics and logs, without secrets.
    key: String,
    /// Its accepted attempts, registered once: counted for every mail sent.
    sent: metrics::Counter,
    /// Failed transiently until then: tried after the others.
    down_until: Mutex<Option<Instant>>,
}

#[derive(Debug)]
enum Transport {
    Smtp(SmtpPool),
    /// The outbox folder: one `{request_id}.eml` per mail.
    File(PathBuf),
    Api(ApiTransport),
}

/// A message built once per send, tried on each target.
struct Built<'a> {
    message: Composed,
    to: &'a Envelope<'a>,
    mail: &'a RenderedMail,
}

impl Mailer {
    /// Builds the transports from the configuration (warns when `MAIL_URL` is the default).
    pub fn from_config(config: &Config) -> Result<Self, MailerError> {
        let composer = Composer::from_config(config)?;
        let urls = match &config.mail_url {
            MailUrl::Failover(list) => list.iter().collect(),
            one => vec![one],
        };
        let targets = urls
            .into_iter()
            .map(|url| target(config, url))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            composer,
            targets: targets.into(),
            attempt_timeout: ATTEMPT_TIMEOUT,
            pauses: Arc::default(),
            pace: None,
            attempt_seconds: Arc::default(),
        })
    }

    /// Shares pauses with the other workers of `namespace` through its
    /// database, and keeps to `MAIL_RATE_LIMIT` when it is set.
    pub async fn coordinate(mut self, pool: PgPool, config: &Config) -> Result<Self, sqlx::Error> {
        self.pauses.share(pool.clone(), config.namespace.clone());
        if let Some(limit) = config.mail_rate_limit {
            self.pace = Some(Arc::new(
                Pace::new(pool, config.namespace.clone(), limit).await?,
            ));
        }
        Ok(self)
    }

    /// The same mailer with another per-attempt deadline (tests use short ones).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sends once (through the next target on a transient failure); the
    /// provider's message id when an HTTP API gives one.
    pub async fn send(
        &self,
        to: &Envelope<'_>,
        mail: &RenderedMail,
    ) -> Result<Option<String>, SendError> {
        let built = self.build(to, mail)?;
        self.attempt(&built).await
    }

    /// Sends, retrying transient failures in-process with exponential backoff
    /// and jitter for at most `budget`; returns the last error otherwise.
    ///
    /// The first attempt always runs; a retry starts only if its delay ends
    /// within `budget`, so the call returns within `budget` plus one attempt
    /// ([`ATTEMPT_TIMEOUT`]) and the wait for a send slot.
    pub async fn send_with_backoff(
        &self,
        to: &Envelope<'_>,
        mail: &RenderedMail,
        budget: Duration,
    ) -> Result<Option<String>, SendError> {
        let built = self.build(to, mail)?;
        let started = Instant::now();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(BACKOFF_MIN)
            .with_factor(2.0)
            .with_max_delay(BACKOFF_MAX)
            .with_jitter()
            .without_max_times();
        (|| self.attempt(&built))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| classify(e) == Classification::Transient)
            .adjust(|e, delay| {
                // Every target paused: wait for the first to come back.
                let delay = match e {
                    SendError::Paused(left) => delay.map(|d| d.max(*left)),
                    _ => delay,
                };
                delay.filter(|d| started.elapsed() + *d <= budget)
            })
            .notify(|e, delay| debug!(error = %e, retry_in_ms = delay.as_millis(), "send failed; retrying"))
            .await
    }

    fn build<'a>(
        &self,
        to: &'a Envelope<'a>,
        mail: &'a RenderedMail,
    ) -> Result<Built<'a>, SendError> {
        let message = self.composer.build(to, mail)?;
        Ok(Built { message, to, mail })
    }

    /// One attempt: each target in turn until one takes the mail or refuses
    /// it for good.
    async fn attempt(&self, built: &Built<'_>) -> Result<Option<String>, SendError> {
        let now = Instant::now();
        let mut order: Vec<&Target> = self.targets.iter().collect();
        // Stable: targets that failed a moment ago go last, in their order.
        order.sort_by_key(|t| t.is_down(now));
        let mut last = None;
        let mut paused: Option<Duration> = None;
        for target in order {
            if let Some(left) = self.pauses.left(&target.key) {
                paused = Some(paused.map_or(left, |p| p.min(left)));
                continue;
            }
            if let Some(pace) = &self.pace {
                pace.wait().await;
            }
            match self.try_target(target, built).await {
                Ok(id) => {
                    target.set_down(None);
                    return Ok(id);
                }
                Err(e) => {
                    if let Some(length) = pause_for(&e) {
                        self.pauses.pause(&target.key, length).await;
                    }
                    if classify(&e) != Classification::Transient {
                        return Err(e);
                    }
                    if self.targets.len() > 1 {
                        warn!(target = %target.key, error = %e, "delivery target failed; trying the next");
                        target.set_down(Some(Instant::now() + DOWN_FOR));
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(SendError::Paused(paused.unwrap_or_default())))
    }

    /// One target under the deadline, measured.
    async fn try_target(
        &self,
        target: &Target,
        built: &Built<'_>,
    ) -> Result<Option<String>, SendError> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.attempt_timeout, self.deliver(target, built)).await {
                Ok(result) => result,
                Err(_) => Err(SendError::Timeout(self.attempt_timeout)),
            };
        let seconds = &self.attempt_seconds;
        let (label, histogram) = match &result {
            Ok(_) => ("sent", &seconds.sent),
            Err(e) => match classify(e) {
                Classification::Transient => ("transient", &seconds.transient),
                Classification::RecipientRejected
                | Classification::Refused(_)
                | Classification::ProviderRejected => ("permanent", &seconds.permanent),
            },
        };
        histogram
            .get_or_init(|| metrics::histogram!(ATTEMPT_SECONDS, "result" => label))
            .record(started.elapsed().as_secs_f64());
        if result.is_ok() {
            target.sent.increment(1);
        } else {
            metrics::counter!(ATTEMPTS, "result" => label, "target" => target.key.clone())
                .increment(1);
        }
        result
    }

    async fn deliver(
        &self,
        target: &Target,
        built: &Built<'_>,
    ) -> Result<Option<String>, SendError> {
        match &target.transport {
            Transport::Smtp(pool) => pool
                .send(&built.message.envelope, &built.message.bytes)
                .await
                .map(|()| None),
            Transport::File(dir) => write_outbox(dir, built.to.request_id, &built.message.bytes)
                .await
                .map(|()| None)
                .map_err(SendError::File),
            Transport::Api(api) => {
                let from = &self.composer.from;
                let from_text = from.to_string();
                let to_name = built.to.to_name.map(str::trim).filter(|n| !n.is_empty());
                let to_text = lettre::message::Mailbox::new(
                    to_name.map(str::to_owned),
                    built.message.to.clone(),
                )
                .to_string();
                let mail = ApiMail {
                    request_id: built.to.request_id,
                    from: &from_text,
                    from_email: from.email.as_ref(),
                    from_name: from.name.as_deref(),
                    to_email: built.to.to_email,
                    to_name,
                    to: &to_text,
                    subject: &built.mail.subject,
                    text: &built.mail.text,
                    html: &built.mail.html,
                    message_id: &built.message.message_id,
                    raw: &built.message.bytes,
                };
                api.send(&mail).await
            }
        }
    }
}

impl Target {
    fn is_down(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| until > now)
    }

    fn set_down(&self, until: Option<Instant>) {
        *self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
    }
}

/// The transport for one target of `MAIL_URL`.
fn target(config: &Config, url: &MailUrl) -> Result<Target, MailerError> {
    let (transport, key) = match url {
        MailUrl::File(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| MailerError::Outbox {
                dir: dir.clone(),
                source,
            })?;
            if config.mail_url_is_default {
                warn!(
                    dir = %dir.display(),
                    "MAIL_URL is not set: mails are NOT sent, they are written as .eml files \
                     to the default outbox; set MAIL_URL=smtp://host:port to send"
                );
            } else {
                warn!(dir = %dir.display(), "MAIL_URL is file://: mails are written as .eml files, not sent");
            }
            (
                Transport::File(dir.clone()),
                format!("file:{}", dir.display()),
            )
        }
        MailUrl::Smtp {
            security,
            host,
            port,
            credentials,
        } => (
            Transport::Smtp(SmtpPool::new(
                *security,
                host,
                *port,
                credentials.as_ref(),
                usize::from(config.worker_concurrency),
            )?),
            format!("smtp:{host}:{port}"),
        ),
        MailUrl::Api(api) => {
            let transport = ApiTransport::new(
                api,
                config.expose_current_secret(),
                usize::from(config.worker_concurrency),
            )?;
            let key = transport.key().to_owned();
            (Transport::Api(transport), key)
        }
        // The parser never nests lists.
        MailUrl::Failover(_) => {
            return Err(MailerError::Endpoint {
                url: "a nested list".into(),
                source: url::ParseError::EmptyHost,
            });
        }
    };
    // The recorder first, so the handle counts into it.
    let _ = crate::metrics::handle();
    let sent = metrics::counter!(ATTEMPTS, "result" => "sent", "target" => key.clone());
    Ok(Target {
        transport,
        key,
        sent,
        down_until: Mutex::new(None),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::mail::test_support::{TestResult, config, envelope, mail, mailer};
    use verimail_tests::smtp::{Mode, SmtpServer};

    #[tokio::test]
    async fn backoff_retries_transient_failures_until_the_server_recovers() -> TestResult {
        let mut server = SmtpServer::start();
        let m = mailer(&server.mail_url())?;
        server.stop();
        let sending = {
            let m = m.clone();
            tokio::spawn(async move {
                m.send_with_backoff(
                    &envelope(None, "carol@example.com"),
                    &mail(),
                    Duration::from_secs(10),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.resume();
        sending.await??;
        assert_eq!(
            server.wait_for_mails(1, Duration::from_secs(5)).await.len(),
            1
        );
        Ok(())
    }

    #[tokio::test]
    async fn backoff_gives_up_when_the_budget_is_spent_and_never_retries_permanent() -> TestResult {
        let server = SmtpServer::start();
        let m = mailer(&server.mail_url())?;
        server.set_mode(Mode::TempFail);
        let started = Instant::now();
        let err = m
            .send_with_backoff(
                &envelope(None, "dan@example.com"),
                &mail(),
                Duration::from_millis(700),
            )
            .await
            .err()
            .ok_or("failure expected")?;
        assert_eq!(err.classification(), Classification::Transient);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let tried = server.stats().rejected;
        assert!((2..=8).contains(&tried), "{tried} attempts");

        server.set_mode(Mode::PermFail);
        let before = server.stats().rejected;
        let err = m
            .send_with_backoff(
                &envelope(None, "dan@example.com"),
                &mail(),
                Duration::from_secs(10),
            )
            .await
            .err()
            .ok_or("failure expected")?;
        assert_eq!(err.classification(), Classification::RecipientRejected);
        assert_eq!(server.stats().rejected - before, 1, "a 5xx is not retried");
        Ok(())
    }

    #[test]
    fn a_bad_mail_from_names_the_variable() -> Result<(), verimail_shared::ConfigError> {
        // Passes the config's light check, fails lettre's parse.
        let c = config(&[("MAIL_FROM", "verimail <no reply@@localhost>")])?;
        let message = Mailer::from_config(&c)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.starts_with("MAIL_FROM: "), "{message}");
        Ok(())
    }
}
