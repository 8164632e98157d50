//! `verimail publish`: one request, validated with the worker's rules,
//! confirmed by the broker.

use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use serde_json::Value;
use verimail_producer::{Producer, ProducerError, Purpose, VerificationRequest};
use verimail_shared::Config;

use super::{Exit, Outcome, flag};

pub const LONG_ABOUT: &str = "\
Publish one verimail.verification.requested event to the namespace's exchange and
print its event id once the broker has confirmed it.

The request is checked first with the worker's own rules; a field that breaks one is
a usage error naming it (exit 2), and nothing is published. The return URL's origin
is checked against RETURN_URL_ALLOWLIST only when that variable is set here;
otherwise the worker checks it (and answers verimail.verification.failed /
return_url_not_allowed).

The event id is the idempotency key: publishing again with the same --id never
sends a second mail.";

pub const EXAMPLES: &str = "\
Examples:
  verimail publish --user-id 42 --email alice@example.com
  verimail publish --user-id 42 --email alice@example.com --name Alice --locale zh-CN \\
      --context '{\"signup_flow\":\"b\"}'
  verimail publish --user-id 42 --email alice@example.com --purpose reset_password \\
      --return-url https://app.example.com/reset --id reset-42-2026-11-24";

/// Arguments of `verimail publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The user (1-128 characters).
    #[arg(long, value_name = "ID")]
    user_id: String,

    /// The address to verify (one RFC 5322 addr-spec, at most 254 characters).
    #[arg(long, value_name = "ADDR")]
    email: String,

    /// The name shown in the mail (at most 256 characters).
    #[arg(long, value_name = "N")]
    name: Option<String>,

    /// BCP 47 language tag of the mail and page (en, zh-CN, ...).
    #[arg(long, value_name = "L")]
    locale: Option<String>,

    /// What the link is for: verify_email (default) or reset_password.
    #[arg(long, value_name = "P", value_parser = parse_purpose)]
    purpose: Option<Purpose>,

    /// Where the user lands after confirming (required for reset_password).
    #[arg(long, value_name = "U")]
    return_url: Option<String>,

    /// A JSON object (at most 4 KiB) echoed on every follow-up event.
    #[arg(long, value_name = "JSON")]
    context: Option<String>,

    /// The event id (1-128 characters); default: a fresh UUIDv7.
    #[arg(long, value_name = "EVENT_ID")]
    id: Option<String>,

    /// The CloudEvent source.
    #[arg(long, value_name = "SOURCE", default_value = "/verimail/cli")]
    source: String,

    /// Seconds to wait for the broker's confirm, retries included.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    timeout: u64,
}

fn parse_purpose(raw: &str) -> Result<Purpose, String> {
    raw.parse()
}

/// Runs `verimail publish`.
pub async fn run(config: &Config, args: PublishArgs) -> Outcome {
    let mut request = VerificationRequest::new(args.user_id, args.email).source(args.source);
    if let Some(name) = args.name {
        request = request.name(name);
    }
    if let Some(locale) = args.locale {
        request = request.locale(locale);
    }
    if let Some(purpose) = args.purpose {
        request = request.purpose(purpose);
    }
    if let Some(url) = args.return_url {
        request = request.return_url(url);
    }
    if let Some(raw) = args.context {
        let context: Value = serde_json::from_str(&raw)
            .map_err(|e| Exit::Usage(format!("--context: not JSON ({e})")))?;
        request = request.context(context);
    }
    if let Some(id) = args.id {
        request = request.id(id);
    }
    let request = request.ensure_id();

    // A usage error never needs the broker: check before connecting.
    let allowlist =
        (!config.return_url_allowlist.is_empty()).then_some(config.return_url_allowlist.as_slice());
    request
        .validate(allowlist)
        .map_err(|e| Exit::Usage(format!("{}: {}", flag(e.field), e.rule)))?;

    let producer = Producer::connect_once(config)
        .await
        .map_err(|e| Exit::Failed(anyhow!(e).context("cannot publish")))?
        .with_publish_timeout(Duration::from_secs(args.timeout));
    let published = producer.request_verification(request).await;
    producer.close().await;
    match published {
        Ok(id) => {
            println!("{id}");
            Ok(())
        }
        Err(ProducerError::Invalid(e)) => {
            Err(Exit::Usage(format!("{}: {}", flag(e.field), e.rule)))
        }
        Err(e) => Err(Exit::Failed(anyhow!(e).context("publish failed"))),
    }
}
