//! Delivery through HTTP APIs (issue 18) with the real worker binary, RabbitMQ
//! and PostgreSQL: SES through `aws-ses-v2-local` (an SES v2 emulator by
//! others, installed by `npm ci` in `tests/node`), Postmark, SendGrid,
//! Mailgun and the generic target against stand-ins in the test that check
//! every field and header their public APIs document and answer as they do;
//! pauses seen by a second worker, failover, and `MAIL_RATE_LIMIT` shared by
//! several workers.
//!
//! The rooms: `providers` (Postmark, SendGrid, Mailgun stand-ins), `generic`
//! (the signed generic target), `ses` (the emulator), `targets` (a pause seen
//! by a second worker, failover), `rate_limit` (one budget for several
//! workers); `support` holds the deployment, `scripted` the recipients whose
//! address tells a stand-in how to answer.

mod generic;
mod providers;
mod rate_limit;
mod scripted;
mod ses;
mod support;
mod targets;

use std::time::Duration;

const WAIT: Duration = Duration::from_secs(45);
