//! End-to-end: one-time codes (issue 16). The real worker and gateway(s) as
//! processes, the real RabbitMQ and PostgreSQL, an SMTP server inside the
//! test; the app's backend is played by `POST /v1/codes/verify` calls with
//! an API key.
//!
//! The rooms: `checks` (the check API: keys, bodies, the countdown to a lock,
//! the Python example), `reset` (a reset code and its link spend each other),
//! `code_only` (`CONFIRM_METHOD=code`), `guessing` (many guesses through
//! several gateways); `support` holds the deployment and the code helpers.

mod checks;
mod code_only;
mod guessing;
mod reset;
mod support;

use std::time::Duration;

const WAIT: Duration = Duration::from_secs(45);
const API_KEY: &str = "test-api-key-0123456789";
