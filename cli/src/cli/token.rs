//! `verimail token mint | inspect`.

use std::io::BufRead as _;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value;
use time::OffsetDateTime;
use verimail_shared::Config;
use verimail_shared::events::{self, Purpose};
use verimail_shared::telemetry::token_prefix;
use verimail_shared::token::{Claims, InspectionStatus, Signer, TokenFormat};

use super::{Exit, Outcome};

/// `verimail token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a token signed like the worker's (needs VERIMAIL_SECRET_KEY).
    #[command(long_about = "\
Print a link token signed with the configured key and format, as the worker would put
it in a mail (the link is {PUBLIC_BASE_URL}/confirm/TOKEN). Needs VERIMAIL_SECRET_KEY.

TOKEN_FORMAT=v1 (default): carries request id, user id, email, purpose, locale, issue
time and expiry (TOKEN_TTL_SECONDS). TOKEN_FORMAT=itsdangerous: carries only the email,
exactly as URLSafeTimedSerializer(SECRET).dumps(email, salt=VERIMAIL_SALT) would.

Examples:
  verimail token mint --email alice@example.com --user-id 42
  echo \"http://127.0.0.1:8080/confirm/$(verimail token mint --email alice@example.com)\"")]
    Mint(MintArgs),
    /// Say whether a token is valid, expired or invalid, and what it carries.
    #[command(long_about = "\
Recognise a token of either format, whatever TOKEN_FORMAT says, check it with the
configured keys (current and VERIMAIL_OLD_SECRET_KEYS), and print one JSON object:
  {\"status\": \"valid\"|\"expired\"|\"invalid\", \"format\": \"v1\"|\"itsdangerous\"|null,
   \"payload\": {...}, \"issued_at\": ..., \"expires_at\": ..., \"reason\": ...}
payload only when the signature holds; reason says why an invalid token was refused.
Exit status 0 for a valid token, 1 otherwise. itsdangerous tokens are checked with
TOKEN_TTL_SECONDS as max_age, under both digests.

TOKEN may be a whole confirmation link, or - to read it from stdin (keeps it out of
the shell history and the process list).

Examples:
  verimail token inspect 'v1.AbCdEfGh.....'
  pbpaste | verimail token inspect -")]
    Inspect(InspectArgs),
}

/// Arguments of `token mint`.
#[derive(Debug, Args)]
pub struct MintArgs {
    /// The address the link confirms.
    #[arg(long, value_name = "ADDR")]
    email: String,
    /// The user (v1 only; default: the email address).
    #[arg(long, value_name = "ID")]
    user_id: Option<String>,
    /// verify_email (default) or reset_password (v1 only).
    #[arg(long, value_name = "P", value_parser = parse_purpose)]
    purpose: Option<Purpose>,
    /// BCP 47 tag of the confirmation page (v1 only).
    #[arg(long, value_name = "L")]
    locale: Option<String>,
    /// The request id the token names (v1 only; default: a fresh UUIDv7).
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

/// Arguments of `token inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The token, a confirmation link holding it, or - for stdin.
    #[arg(value_name = "TOKEN")]
    token: String,
}

fn parse_purpose(raw: &str) -> Result<Purpose, String> {
    raw.parse()
}

/// Runs `verimail token ...`.
pub fn run(config: &Config, command: TokenCommand) -> Outcome {
    let keys = config.keys()?;
    let signer = Signer::new(&keys, config.itsdangerous_digest);
    match command {
        TokenCommand::Mint(args) => mint(config, &signer, args),
        TokenCommand::Inspect(args) => inspect(config, &signer, args),
    }
}

fn usage(flag: &str, rule: impl std::fmt::Display) -> Exit {
    Exit::Usage(format!("{flag}: {rule}"))
}

fn check_id(flag: &str, value: &str) -> Result<(), Exit> {
    let n = value.chars().count();
    if n == 0 || n > 128 {
        return Err(usage(flag, format!("{n} characters, expected 1-128")));
    }
    Ok(())
}

fn mint(config: &Config, signer: &Signer, args: MintArgs) -> Outcome {
    events::validate_email(&args.email).map_err(|rule| usage("--email", rule))?;
    let now = OffsetDateTime::now_utc();
    let token = match config.token_format {
        TokenFormat::V1 => {
            let user_id = args.user_id.unwrap_or_else(|| args.email.clone());
            check_id("--user-id", &user_id)?;
            if let Some(locale) = &args.locale {
                events::validate_locale(locale).map_err(|rule| usage("--locale", rule))?;
            }
            let request_id = args
                .request_id
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            check_id("--request-id", &request_id)?;
            let ttl = i64::try_from(config.token_ttl.as_secs()).unwrap_or(i64::MAX);
            let expires_at = now
                .checked_add(time::Duration::seconds(ttl))
                .context("TOKEN_TTL_SECONDS: too large")?;
            signer.mint_v1(&Claims {
                request_id,
                user_id,
                email: args.email,
                purpose: args.purpose.unwrap_or(Purpose::VerifyEmail).as_str().into(),
                locale: args.locale,
                issued_at: now,
                expires_at,
            })
        }
        TokenFormat::Itsdangerous => {
            if args.user_id.is_some()
                || args.purpose.is_some()
                || args.locale.is_some()
                || args.request_id.is_some()
            {
                eprintln!(
                    "warning: TOKEN_FORMAT=itsdangerous tokens carry only the email; \
                     --user-id, --purpose, --locale and --request-id are ignored"
                );
            }
            signer.mint_itsdangerous(&args.email, now)
        }
    };
    tracing::info!(token = %token_prefix(&token), format = %config.token_format, "minted");
    println!("{token}");
    Ok(())
}

/// The token itself from `-` (stdin), a confirmation link, or the argument.
fn read_token(arg: &str) -> Result<String, Exit> {
    let raw = if arg == "-" {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the token from stdin")?;
        line
    } else {
        arg.to_owned()
    };
    let raw = raw.trim();
    let token = match raw.rfind("/confirm/") {
        Some(at) => {
            let rest = &raw[at + "/confirm/".len()..];
            rest.split(['?', '#', '/']).next().unwrap_or(rest)
        }
        None => raw,
    };
    if token.is_empty() {
        return Err(Exit::Usage("TOKEN: empty".into()));
    }
    Ok(token.to_owned())
}

fn inspect(config: &Config, signer: &Signer, args: InspectArgs) -> Outcome {
    let token = read_token(&args.token)?;
    let inspection = signer.inspect(
        &token,
        config.token_ttl.as_secs(),
        OffsetDateTime::now_utc(),
    );
    let mut object = match serde_json::to_value(&inspection).context("cannot serialize")? {
        Value::Object(map) => map,
        _ => return Err(Exit::Failed(anyhow::anyhow!("inspection is not an object"))),
    };
    // The contract's keys are always present, null when unknown.
    for key in ["format", "issued_at", "expires_at"] {
        object.entry(key).or_insert(Value::Null);
    }
    println!("{}", Value::Object(object));
    if inspection.status == InspectionStatus::Valid {
        Ok(())
    } else {
        Err(Exit::Negative)
    }
}
