//! The bus: every exchange and queue name and argument, declared in one place
//! ([`declare`]), connections that survive a lost node ([`Bus`]), and a
//! publisher that only reports success once the broker has confirmed
//! ([`Publisher`]).
//!
//! Nothing outside this module spells a queue name.

//! Rooms: `topology` (names and declarations), `connection` ([`Bus`]),
//! `publish` ([`Publisher`], [`Outgoing`]), `headers` (dead-letter and replay headers).

use std::time::Duration;

mod connection;
mod headers;
mod publish;
mod topology;

pub use connection::{Bus, OPEN_TIMEOUT, SETUP_TIMEOUT, reconnect_backoff};
pub use headers::{dead_letter_headers, dead_letter_reason, header_str, replay_headers};
pub use publish::{Outgoing, Publisher};
pub use topology::{Topology, bind_temporary_queue, declare, declare_exchange, declare_subscriber};

/// Header naming why the worker dead-lettered a message (a code).
pub const HEADER_REASON: &str = "x-verimail-reason";
/// Header with the human-readable detail of a dead letter.
pub const HEADER_DETAIL: &str = "x-verimail-detail";
/// Header `verimail dead replay` sets (AMQP boolean `true`) on every copy it
/// re-publishes, so the worker treats the request as a fresh attempt.
pub const HEADER_REPLAYED: &str = "x-verimail-replayed";
/// Header the worker sets on a request it sends to a retry queue, counting
/// delayed redeliveries (the database holds the authoritative attempt count).
pub const HEADER_RETRY: &str = "x-verimail-retry";

/// Delays of the retry queues, growing; a transient failure waits in the
/// first tier whose delay fits the time left in the retry window.
pub const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// How many times the broker redelivers one message before moving it to
/// `{ns}.dead`. Every return counts (a nack, a consumer that closes without
/// ack, a node lost), so graceful shutdowns and failovers use it up too: it is
/// set high, for real poison (a message that crashes its consumer) only.
pub const DELIVERY_LIMIT: i64 = 50;

/// Failures talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A protocol or I/O error from lapin.
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// No node in `AMQP_URL` answered.
    #[error("no RabbitMQ node answered ({tried}): {last}")]
    Unreachable {
        /// The redacted URLs tried.
        tried: String,
        /// The last error seen.
        #[source]
        last: lapin::Error,
    },
    /// Shutdown was requested while waiting for the broker.
    #[error("shutting down")]
    Cancelled,
    /// The broker refused to take the message (a nack).
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// The message matched no queue (returned to the publisher as mandatory).
    #[error("the message was returned unroutable: {0}")]
    Unroutable(String),
    /// The broker did not answer in time: a channel that would not open, a
    /// set-up on it (topology, consumer) that did not finish, or a publish
    /// never confirmed. The channel (or connection) is dropped and a retry
    /// starts afresh.
    #[error("RabbitMQ did not answer ({what}) within {after:?}")]
    TimedOut {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: std::time::Duration,
    },
}

impl BusError {
    /// Whether a retry later may succeed (everything but shutdown).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::topology::table;
    use super::*;
    use lapin::types::AMQPValue;

    #[test]
    fn names_derive_from_the_namespace() {
        let t = Topology::new("acme");
        assert_eq!(t.exchange(), "acme");
        assert_eq!(t.worker_queue(), "acme.worker");
        assert_eq!(t.dead_queue(), "acme.dead");
        assert_eq!(t.retry_queue(RETRY_DELAYS[0]), "acme.retry.5s");
    }

    #[test]
    fn a_replayed_copy_keeps_the_letters_headers_but_not_its_death() {
        let letter = table(&[
            (
                "x-verimail-failed-outcome",
                AMQPValue::LongString("o-1".into()),
            ),
            (
                HEADER_REASON,
                AMQPValue::LongString("delivery_failed".into()),
            ),
            (HEADER_DETAIL, AMQPValue::LongString("451".into())),
            (
                "x-first-death-reason",
                AMQPValue::LongString("rejected".into()),
            ),
        ]);
        let copy = replay_headers(Some(&letter));
        assert_eq!(
            header_str(Some(&copy), "x-verimail-failed-outcome").as_deref(),
            Some("o-1")
        );
        assert_eq!(header_str(Some(&copy), HEADER_REASON), None);
        assert_eq!(header_str(Some(&copy), "x-first-death-reason"), None);
        assert_eq!(
            copy.inner().get(HEADER_REPLAYED),
            Some(&AMQPValue::Boolean(true))
        );
    }

    #[test]
    fn a_broker_dead_letter_reads_its_reason_from_x_first_death_reason() {
        let headers = table(&[
            (
                "x-first-death-reason",
                AMQPValue::LongString("delivery_limit".into()),
            ),
            (
                "x-first-death-queue",
                AMQPValue::LongString("ns.worker".into()),
            ),
        ]);
        let (reason, detail) = dead_letter_reason(Some(&headers));
        assert_eq!(reason.as_deref(), Some("delivery_limit"));
        assert_eq!(
            detail.as_deref(),
            Some("moved by the broker from ns.worker")
        );
        let ours = dead_letter_headers("undecodable", "not JSON");
        assert_eq!(
            dead_letter_reason(Some(&ours)),
            (Some("undecodable".into()), Some("not JSON".into()))
        );
    }
}
