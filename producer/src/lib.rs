//! The Rust client of verimail: ask for verification mails, react to what
//! happens to them, and trust the proofs the confirmation gateway hands back.
//!
//! - [`Producer`] publishes [`VerificationRequest`]s (validated with the
//!   worker's own rules, confirmed by the broker, retried through reconnects).
//! - [`Subscriber`] binds a durable queue of your own to the event types you
//!   want and yields decoded [`Event`]s to acknowledge.
//! - [`ProofVerifier`] checks the `verimail_proof` of a `reset_password`
//!   redirect.
//! - [`dead`] lists and replays the dead-letter queue (what `verimail dead` runs).
//! - `schema` (feature `schema-check`) validates event bodies against the
//!   published JSON Schemas.
//!
//! Everything reads the same environment as the services ([`Config::from_env`]):
//! `AMQP_URL`, `VERIMAIL_NAMESPACE`, and for proofs `VERIMAIL_SECRET_KEY`.
//!
//! This crate is only the client: the `verimail` command line is the
//! `verimail-cli` crate (`cli/`), so a service depending on this one compiles
//! no argument parser, database driver or mail parser.
//!
//! ```no_run
//! use verimail_producer::{Config, Event, Producer, Subscriber, VerificationRequest};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//!
//! // Ask for a mail; the returned id is the `request_id` of every follow-up event.
//! let producer = Producer::connect(&config).await?.with_source("/accounts");
//! let request_id = producer
//!     .request_verification(VerificationRequest::new("42", "alice@example.com"))
//!     .await?;
//!
//! // React when the address is confirmed.
//! let mut verified = Subscriber::bind(&config, "accounts", &["verimail.email.verified"]).await?;
//! while let Some(Ok(received)) = verified.next().await {
//!     if let Event::Verified(event) = &received.event {
//!         println!("{:?} confirmed {}", event.data.user_id, event.data.email);
//!     }
//!     received.ack().await?;
//! }
//! # let _ = request_id;
//! # Ok(())
//! # }
//! ```

pub mod dead;
mod producer;
mod proof;
mod request;
#[cfg(feature = "schema-check")]
pub mod schema;
mod subscriber;

pub use producer::{DEFAULT_SOURCE, Producer, ProducerError};
pub use proof::{
    PROOF_MAX_AGE_SECONDS, ProofError, ProofPayload, ProofVerifier, TokenError, verify_proof,
};
pub use request::{InvalidRequest, VerificationRequest};
pub use subscriber::{Received, SubscribeError, Subscriber};
pub use verimail_shared::Config;
pub use verimail_shared::events::{
    CloudEvent, EMAIL_VERIFIED, Event, FailedData, FailureReason, Outcome, Purpose, SentData,
    ThrottledData, VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT,
    VERIFICATION_THROTTLED, VerifiedData,
};
