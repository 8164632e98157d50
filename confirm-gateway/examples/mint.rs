//! Prints `v1` confirm tokens signed with the configured key, one per line, for
//! screenshots and load tests (`verimail token mint` is the tool for people).
//!
//! ```sh
//! VERIMAIL_SECRET_KEY=… cargo run -p verimail-gateway --example mint -- --count 3 --locale zh-CN
//! ```

use clap::Parser;
use time::OffsetDateTime;
use verimail_shared::Config;
use verimail_shared::token::{Claims, Signer};

/// Mint confirm tokens (request ids `{prefix}{n}`, addresses `{prefix}{n}@example.com`).
#[derive(Debug, Parser)]
struct Args {
    /// How many tokens.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Request id prefix (make it unique per run: a request id confirms once).
    #[arg(long, default_value = "req-")]
    prefix: String,
    /// `verify_email` or `reset_password`.
    #[arg(long, default_value = "verify_email")]
    purpose: String,
    /// Locale claim (`en`, `zh-CN`...).
    #[arg(long)]
    locale: Option<String>,
    /// Lifetime in seconds; negative mints an already expired token.
    #[arg(long, default_value_t = 3600, allow_hyphen_values = true)]
    ttl: i64,
    /// Print full links (`PUBLIC_BASE_URL/confirm/TOKEN`) instead of tokens.
    #[arg(long)]
    links: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::from_env()?;
    let signer = Signer::new(&config.keys()?, config.itsdangerous_digest);
    let now = OffsetDateTime::now_utc();
    let (issued_at, expires_at) = if args.ttl > 0 {
        (now, now + time::Duration::seconds(args.ttl))
    } else {
        (
            now + time::Duration::seconds(args.ttl) - time::Duration::hours(1),
            now + time::Duration::seconds(args.ttl.min(-1)),
        )
    };
    let mut out = String::new();
    for n in 0..args.count {
        let id = format!("{}{n}", args.prefix);
        let token = signer.mint_v1(&Claims {
            request_id: id.clone(),
            user_id: format!("user-{id}"),
            email: format!("{id}@example.com"),
            purpose: args.purpose.clone(),
            locale: args.locale.clone(),
            issued_at,
            expires_at,
        });
        if args.links {
            out.push_str(&config.confirm_link(&token));
        } else {
            out.push_str(&token);
        }
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
