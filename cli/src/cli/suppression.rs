//! `verimail suppression list|add|remove`: the suppression list, straight in
//! PostgreSQL (`DATABASE_URL`), as the gateway's `/v1/suppressions` sees it.

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;
use verimail_shared::Config;
use verimail_shared::db::{self, PoolSettings};
use verimail_shared::events::{rfc3339, validate_email};
use verimail_shared::suppression::{self, Suppression, SuppressionReason};

use super::{Exit, Outcome};

pub(crate) const LONG_ABOUT: &str = "\
Read and edit the suppression list: addresses verimail will not mail (the worker
answers a request for one `failed`/`suppressed`). Entries come from provider bounces
and complaints (gateway webhooks), from permanent refusals of the recipient
(SUPPRESS_ON_REJECT) and from operators. Addresses compare case-insensitively.
Reads DATABASE_URL.";

pub(crate) const EXAMPLES: &str = "\
Examples:
  verimail suppression list
  verimail suppression list --email alice@example.com
  verimail suppression add alice@example.com            # reason: manual
  verimail suppression add bob@example.com --reason complaint
  verimail suppression remove alice@example.com         # exit 1 when it was not there";

/// `verimail suppression …`
#[derive(Debug, Subcommand)]
pub enum SuppressionCommand {
    /// Print every entry (or one address's) as one JSON line:
    /// {"email","reason","source","created_at"}.
    List {
        /// Only this address (any case).
        #[arg(long, value_name = "ADDR")]
        email: Option<String>,
    },
    /// Suppress an address (an address already suppressed keeps its entry);
    /// prints the entry.
    Add {
        /// The address.
        #[arg(value_name = "ADDR")]
        email: String,
        /// Why: bounce, complaint, recipient_rejected or manual.
        #[arg(long, default_value = "manual", value_parser = parse_reason)]
        reason: SuppressionReason,
    },
    /// Lift an address's suppression; exit 1 when it was not suppressed.
    Remove {
        /// The address (any case).
        #[arg(value_name = "ADDR")]
        email: String,
    },
}

fn parse_reason(s: &str) -> Result<SuppressionReason, String> {
    s.parse()
}

fn line(s: &Suppression) -> String {
    json!({
        "email": s.email,
        "reason": s.reason.as_str(),
        "source": s.source,
        "created_at": rfc3339::format(s.created_at),
    })
    .to_string()
}

fn address(email: &str) -> Result<&str, Exit> {
    let email = email.trim();
    validate_email(email)
        .map(|()| email)
        .map_err(|p| Exit::Usage(format!("ADDR: {p}")))
}

/// Runs `verimail suppression …`.
pub async fn run(config: &Config, command: SuppressionCommand) -> Outcome {
    // Addresses are checked before any connection: a typo is a usage error.
    match &command {
        SuppressionCommand::List { email: Some(e) } => {
            address(e).map_err(|_| Exit::Usage(format!("--email: not an address: {e}")))?;
        }
        SuppressionCommand::Add { email, .. } | SuppressionCommand::Remove { email } => {
            address(email)?;
        }
        SuppressionCommand::List { email: None } => {}
    }
    let settings = PoolSettings {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
    };
    let pool = db::connect(&config.database_url, config.auto_migrate, settings)
        .await
        .context("cannot reach the database")?;
    let result = match command {
        SuppressionCommand::List { email } => {
            let entries = suppression::list(&pool, email.as_deref().map(str::trim))
                .await
                .context("reading the suppression list")?;
            for entry in &entries {
                println!("{}", line(entry));
            }
            Ok(())
        }
        SuppressionCommand::Add { email, reason } => {
            let (entry, added) = suppression::add(&pool, address(&email)?, reason, "cli", None)
                .await
                .context("adding to the suppression list")?;
            if !added {
                eprintln!(
                    "{} was already suppressed ({}); the entry is unchanged",
                    entry.email, entry.reason
                );
            }
            println!("{}", line(&entry));
            Ok(())
        }
        SuppressionCommand::Remove { email } => {
            let email = address(&email)?;
            if suppression::remove(&pool, email)
                .await
                .context("removing from the suppression list")?
            {
                eprintln!("{email}: suppression lifted");
                Ok(())
            } else {
                eprintln!("{email} is not on the suppression list");
                Err(Exit::Negative)
            }
        }
    };
    pool.close().await;
    result
}
