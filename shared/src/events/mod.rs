//! CloudEvents 1.0 (structured JSON mode) envelopes and the typed `data` of
//! the seven verimail event types.
//!
//! Decoding a request is strict and explains itself: a body that is not a
//! CloudEvent is [`DecodeError::Undecodable`] (nobody to answer, so it is
//! dead-lettered); a CloudEvent whose data breaks a rule is
//! [`DecodeError::Invalid`], which names the field and the rule and carries
//! what *was* valid so the `failed` outcome can echo it.

pub mod rfc3339;

mod decode;
mod deliverability;
mod envelope;
mod fields;
mod outcome;
mod request;
mod validate;

pub use decode::{decode_request, peek_id};
pub use deliverability::{BounceKind, BouncedData, ComplainedData, MailProvider, NoticeData};
pub use envelope::CloudEvent;
pub use outcome::{
    Event, EventError, FailedData, FailureReason, Outcome, OutcomeFields, SentData, ThrottledData,
    VerifiedData, VerifyMethod,
};
pub use request::{DecodeError, Echo, Policy, Purpose, RequestData, RuleBroken, ValidRequest};
pub use validate::{
    parse_context, parse_return_url, parse_user_id, resolve_locale, validate_email,
    validate_locale, validate_name,
};

/// `type` of a verification request (also its routing key).
pub const VERIFICATION_REQUESTED: &str = "verimail.verification.requested";
/// `type` of the outcome: the SMTP server accepted the mail.
pub const VERIFICATION_SENT: &str = "verimail.verification.sent";
/// `type` of the outcome: a mail went out too recently.
pub const VERIFICATION_THROTTLED: &str = "verimail.verification.throttled";
/// `type` of the outcome: the request could not be served.
pub const VERIFICATION_FAILED: &str = "verimail.verification.failed";
/// `type` of the gateway's event: a link was confirmed.
pub const EMAIL_VERIFIED: &str = "verimail.email.verified";
/// `type` of the gateway's event: a provider reported a bounce.
pub const EMAIL_BOUNCED: &str = "verimail.email.bounced";
/// `type` of the gateway's event: a provider reported a spam complaint.
pub const EMAIL_COMPLAINED: &str = "verimail.email.complained";
/// AMQP `content_type` of every message.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// A request body larger than this is refused (`invalid_request`, field `body`).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Bodies larger than this are not even parsed for their id.
const MAX_PARSED_BODY_BYTES: usize = 1024 * 1024;
/// Largest serialized `context`.
pub const MAX_CONTEXT_BYTES: usize = 4 * 1024;
