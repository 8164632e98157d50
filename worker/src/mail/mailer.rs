//! [`Mailer`]: the transport `MAIL_URL` names, one deadline per attempt, and
//! in-process retries of transient failures with backoff.
//!
//! Every attempt runs under a deadline ([`ATTEMPT_TIMEOUT`]): lettre applies
//! its own timeout to the TCP connect only, and a server that accepts and then
//! stops answering must not hold a worker's slot forever (see [`super::smtp`]
//! for why a timed-out SMTP connection is never reused).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use lettre::Message;
use lettre::address::AddressError;
use tracing::{debug, warn};
use verimail_shared::config::{Config, MailUrl};

use super::message::Composer;
use super::outbox::write_outbox;
use super::smtp::SmtpPool;
use super::{Classification, Envelope, RenderedMail, SendError, classify};

/// Longest a single delivery attempt may take, connection included. Long
/// enough for a slow server's reply to the message (content scanning), short
/// enough that a stuck one frees the worker's slot.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// First delay between in-process attempts; it doubles, with jitter, up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between in-process attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Histogram of single attempts, seconds, by `result`.
pub const ATTEMPT_SECONDS: &str = "verimail_worker_smtp_attempt_seconds";
/// Counter of attempts by `result` (`sent`, `transient`, `permanent`).
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
}

/// Delivers mail over pooled SMTP or into a `file://` outbox.
#[derive(Debug, Clone)]
pub struct Mailer {
    composer: Composer,
    transport: Arc<Transport>,
    attempt_timeout: Duration,
}

#[derive(Debug)]
enum Transport {
    Smtp(SmtpPool),
    /// The outbox folder: one `{request_id}.eml` per mail.
    File(PathBuf),
}

impl Mailer {
    /// Builds the transport from the configuration (warns when `MAIL_URL` is the default).
    pub fn from_config(config: &Config) -> Result<Self, MailerError> {
        let composer = Composer::from_config(config)?;
        let transport = match &config.mail_url {
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
                Transport::File(dir.clone())
            }
            MailUrl::Smtp {
                security,
                host,
                port,
                credentials,
            } => Transport::Smtp(SmtpPool::new(
                *security,
                host,
                *port,
                credentials.as_ref(),
                usize::from(config.worker_concurrency),
            )?),
        };
        Ok(Self {
            composer,
            transport: Arc::new(transport),
            attempt_timeout: ATTEMPT_TIMEOUT,
        })
    }

    /// The same mailer with another per-attempt deadline (tests use short ones).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sends once.
    pub async fn send(&self, to: &Envelope<'_>, mail: &RenderedMail) -> Result<(), SendError> {
        let message = self.composer.build(to, mail)?;
        self.attempt(&message, to.request_id).await
    }

    /// Sends, retrying transient failures in-process with exponential backoff
    /// and jitter for at most `budget`; returns the last error otherwise.
    ///
    /// The first attempt always runs; a retry starts only if its delay ends
    /// within `budget`, so the call returns within `budget` plus one attempt
    /// ([`ATTEMPT_TIMEOUT`]).
    pub async fn send_with_backoff(
        &self,
        to: &Envelope<'_>,
        mail: &RenderedMail,
        budget: Duration,
    ) -> Result<(), SendError> {
        let message = self.composer.build(to, mail)?;
        let started = Instant::now();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(BACKOFF_MIN)
            .with_factor(2.0)
            .with_max_delay(BACKOFF_MAX)
            .with_jitter()
            .without_max_times();
        (|| self.attempt(&message, to.request_id))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| classify(e) == Classification::Transient)
            .adjust(|_, delay| delay.filter(|d| started.elapsed() + *d <= budget))
            .notify(|e, delay| debug!(error = %e, retry_in_ms = delay.as_millis(), "send failed; retrying"))
            .await
    }

    /// One attempt under the deadline, measured.
    async fn attempt(&self, message: &Message, request_id: &str) -> Result<(), SendError> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.attempt_timeout, self.deliver(message, request_id))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(SendError::Timeout(self.attempt_timeout)),
            };
        let label = match &result {
            Ok(()) => "sent",
            Err(e) => match classify(e) {
                Classification::Transient => "transient",
                Classification::RecipientRejected | Classification::Refused(_) => "permanent",
            },
        };
        metrics::histogram!(ATTEMPT_SECONDS, "result" => label)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(ATTEMPTS, "result" => label).increment(1);
        result
    }

    async fn deliver(&self, message: &Message, request_id: &str) -> Result<(), SendError> {
        let bytes = message.formatted();
        let envelope = message.envelope();
        match &*self.transport {
            Transport::Smtp(pool) => pool.send(envelope, &bytes).await,
            Transport::File(dir) => write_outbox(dir, request_id, &bytes)
                .await
                .map_err(SendError::File),
        }
    }
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
