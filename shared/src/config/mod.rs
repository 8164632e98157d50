//! Configuration from the environment, exactly the variables of `CONTRACT.md`.
//!
//! Every binary calls [`Config::from_env`] once at start. A wrong value stops the
//! program with one line naming the variable ([`ConfigError`]'s `Display`), so an
//! operator never has to guess which of twenty variables is at fault.
//!
//! Rooms: [`mail_url`] parses `MAIL_URL` and names outbox files;
//! [`webhooks`] parses `WEBHOOK_SECRETS`; `env` reads
//! and checks single variables; this file holds [`Config`] itself, its
//! defaults and the few values other crates share.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::token::{Digest, Keys, TokenFormat};

mod env;
mod mail_url;
mod rate_limit;
pub mod webhooks;

pub use mail_url::{ApiProvider, ApiTarget, MailUrl, SmtpSecurity, outbox_file_name};
pub use rate_limit::MailRateLimit;
pub use webhooks::{SesTopics, WebhookSecrets};

use env::Env;

/// A configuration variable that is missing or holds a wrong value.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault, e.g. `THROTTLE_SECONDS`.
    pub variable: &'static str,
    /// What is wrong with it, in words (never its secret value).
    pub problem: String,
}

impl ConfigError {
    fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            problem: problem.into(),
        }
    }
}

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default on a terminal).
    #[default]
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Everything the binaries read from the environment.
///
/// Secrets are held in [`SecretString`], so `Debug` never prints them.
#[derive(Debug, Clone)]
pub struct Config {
    /// RabbitMQ node URLs (`AMQP_URL`, comma-separated for a cluster).
    pub amqp_urls: Vec<String>,
    /// PostgreSQL URL (`DATABASE_URL`).
    pub database_url: String,
    /// Apply embedded migrations at start (`VERIMAIL_AUTO_MIGRATE`).
    pub auto_migrate: bool,
    /// Prefix of every exchange and queue (`VERIMAIL_NAMESPACE`).
    pub namespace: String,
    secret_key: Option<SecretString>,
    old_secret_keys: Vec<SecretString>,
    /// itsdangerous-style salt (`VERIMAIL_SALT`).
    pub salt: String,
    /// What the worker mints (`TOKEN_FORMAT`).
    pub token_format: TokenFormat,
    /// Whether the gateway accepts itsdangerous tokens (`ACCEPT_ITSDANGEROUS`).
    pub accept_itsdangerous: bool,
    /// Digest of itsdangerous tokens (`ITSDANGEROUS_DIGEST`).
    pub itsdangerous_digest: Digest,
    /// Link lifetime (`TOKEN_TTL_SECONDS`).
    pub token_ttl: Duration,
    /// Minimum gap between two mails to one user for one purpose (`THROTTLE_SECONDS`).
    pub throttle: Duration,
    /// Base of every link (`PUBLIC_BASE_URL`), without a trailing slash.
    pub public_base_url: String,
    /// Origins a `return_url` may point to (`RETURN_URL_ALLOWLIST`).
    pub return_url_allowlist: Vec<url::Origin>,
    /// Mail delivery (`MAIL_URL`).
    pub mail_url: MailUrl,
    /// Whether `MAIL_URL` was left at its default (the worker warns at start).
    pub mail_url_is_default: bool,
    /// Sender mailbox (`MAIL_FROM`).
    pub mail_from: String,
    /// One budget of mails for every worker of the namespace (`MAIL_RATE_LIMIT`); none: no limit.
    pub mail_rate_limit: Option<MailRateLimit>,
    /// Folder of templates overriding the built-in ones (`TEMPLATES_DIR`).
    pub templates_dir: Option<PathBuf>,
    /// Messages in flight per worker (`WORKER_CONCURRENCY`).
    pub worker_concurrency: u16,
    /// Threads of the worker's async runtime (`WORKER_THREADS`).
    pub worker_threads: usize,
    /// How long transient delivery failures are retried (`MAIL_RETRY_WINDOW_SECONDS`).
    pub mail_retry_window: Duration,
    /// Gateway listen address (`GATEWAY_ADDR`).
    pub gateway_addr: SocketAddr,
    /// Worker's metrics and health address (`METRICS_ADDR`).
    pub metrics_addr: SocketAddr,
    /// Gateway's metrics and health address: `METRICS_ADDR` when set, else
    /// [`defaults::GATEWAY_METRICS_ADDR`], so a worker and a gateway started
    /// side by side with the defaults do not fight over one port.
    pub gateway_metrics_addr: SocketAddr,
    /// Whether `GET /confirm/{token}` confirms a `verify_email` link at once
    /// (`CONFIRM_ON_GET`); by default every purpose shows the button page and
    /// only `POST` confirms, because mail scanners fetch links.
    pub confirm_on_get: bool,
    /// What a mail carries: a link, a code or both (`CONFIRM_METHOD`).
    pub confirm_method: ConfirmMethod,
    /// Digits in a mailed code (`CODE_LENGTH`, 6 to 10).
    pub code_length: u8,
    /// Wrong tries after which a code is dead (`CODE_MAX_ATTEMPTS`).
    pub code_max_attempts: u32,
    /// Keys of the gateway's `/v1/` API (`GATEWAY_API_KEYS`); empty: the API
    /// answers 401 to everyone.
    pub gateway_api_keys: Vec<SecretString>,
    /// `SUPPRESS_ON_REJECT`: a permanent refusal of the recipient suppresses it.
    pub suppress_on_reject: bool,
    /// `WEBHOOK_SECRETS`: the providers whose webhooks the gateway serves.
    pub webhook_secrets: WebhookSecrets,
    /// Confirm requests per client address per minute (`CONFIRM_RATE_LIMIT_PER_MINUTE`).
    pub confirm_rate_limit_per_minute: u32,
    /// Peers whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<IpNet>,
    /// How long request, throttle and confirmation records are kept (`RETENTION_HOURS`).
    pub retention: Duration,
    /// Log format (`LOG_FORMAT`).
    pub log_format: LogFormat,
}

/// What a mail carries (`CONFIRM_METHOD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfirmMethod {
    /// Only the link.
    Link,
    /// Only a one-time code (no link in the mail).
    Code,
    /// The link and a code (the default).
    #[default]
    Both,
}

impl ConfirmMethod {
    /// Whether the mail carries the confirm link.
    pub fn mails_link(self) -> bool {
        matches!(self, Self::Link | Self::Both)
    }

    /// Whether the mail carries a one-time code.
    pub fn mails_code(self) -> bool {
        matches!(self, Self::Code | Self::Both)
    }
}

impl FromStr for ConfirmMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "link" => Ok(Self::Link),
            "code" => Ok(Self::Code),
            "both" => Ok(Self::Both),
            _ => Err("expected link, code or both".into()),
        }
    }
}

/// The range of `CODE_LENGTH`: six digits are the peers' habit (a million
/// codes against `CODE_MAX_ATTEMPTS` tries); past ten, people mistype more
/// than attackers gain.
pub const CODE_LENGTHS: std::ops::RangeInclusive<u8> = 6..=10;

/// The largest `CODE_MAX_ATTEMPTS`: more tries than this turn a code into
/// something a patient attacker can guess (1,000 tries on a 6-digit code is a
/// 1 in 1,000 chance).
pub const MAX_CODE_ATTEMPTS: u32 = 1000;

/// Default values, as written in the contract.
pub mod defaults {
    /// `AMQP_URL`
    pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    /// `DATABASE_URL`
    pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/verimail";
    /// `VERIMAIL_NAMESPACE`
    pub const NAMESPACE: &str = "verimail";
    /// `VERIMAIL_SALT`
    pub const SALT: &str = "email-confirm";
    /// `PUBLIC_BASE_URL`
    pub const PUBLIC_BASE_URL: &str = "http://127.0.0.1:8080";
    /// `MAIL_URL`
    pub const MAIL_URL: &str = "file://./outbox";
    /// `MAIL_FROM`
    pub const MAIL_FROM: &str = "verimail <no-reply@localhost>";
    /// `GATEWAY_ADDR`
    pub const GATEWAY_ADDR: &str = "127.0.0.1:8080";
    /// `METRICS_ADDR`
    pub const METRICS_ADDR: &str = "127.0.0.1:9464";
    /// `METRICS_ADDR` of the gateway
    pub const GATEWAY_METRICS_ADDR: &str = "127.0.0.1:9465";
}

impl Config {
    /// Reads the process environment (after `.env`, see [`load_dotenv`]).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so tests need not touch the
    /// process environment (which is shared by every test thread).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let amqp_urls = env.amqp_urls()?;
        let namespace = env.string("VERIMAIL_NAMESPACE", defaults::NAMESPACE);
        if namespace.is_empty()
            || namespace.len() > 200
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(ConfigError::new(
                "VERIMAIL_NAMESPACE",
                "must be 1-200 characters of A-Z a-z 0-9 . - _",
            ));
        }
        let secret_key = env.secret_key()?;
        let old_secret_keys = env
            .get("VERIMAIL_OLD_SECRET_KEYS")
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(|k| SecretString::from(k.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let token_format: TokenFormat = env.parse("TOKEN_FORMAT", TokenFormat::V1)?;
        let accept_itsdangerous = env.bool(
            "ACCEPT_ITSDANGEROUS",
            token_format == TokenFormat::Itsdangerous,
        )?;
        let token_ttl = env.seconds("TOKEN_TTL_SECONDS", 3600, 1)?;
        let retention_hours = env.number::<u64>("RETENTION_HOURS", 168, 1)?;
        let retention = Duration::from_secs(retention_hours.saturating_mul(3600));
        if retention <= token_ttl {
            return Err(ConfigError::new(
                "RETENTION_HOURS",
                format!(
                    "must exceed TOKEN_TTL_SECONDS ({} s), or live links would lose their records",
                    token_ttl.as_secs()
                ),
            ));
        }
        let public_base_url = env.public_base_url()?;
        let mail_raw = env.get("MAIL_URL");
        let mail_url_is_default = mail_raw.is_none();
        let mail_url = mail_raw
            .as_deref()
            .unwrap_or(defaults::MAIL_URL)
            .parse()
            .map_err(|p| ConfigError::new("MAIL_URL", p))?;
        let mail_from = env.string("MAIL_FROM", defaults::MAIL_FROM);
        check_mailbox(&mail_from).map_err(|p| ConfigError::new("MAIL_FROM", p))?;
        Ok(Self {
            amqp_urls,
            database_url: env.string("DATABASE_URL", defaults::DATABASE_URL),
            auto_migrate: env.bool("VERIMAIL_AUTO_MIGRATE", true)?,
            namespace,
            secret_key,
            old_secret_keys,
            salt: env.string("VERIMAIL_SALT", defaults::SALT),
            token_format,
            accept_itsdangerous,
            itsdangerous_digest: env.parse("ITSDANGEROUS_DIGEST", Digest::Sha1)?,
            token_ttl,
            throttle: env.seconds("THROTTLE_SECONDS", 60, 0)?,
            public_base_url,
            return_url_allowlist: env.allowlist()?,
            mail_url,
            mail_url_is_default,
            mail_from,
            mail_rate_limit: env
                .get("MAIL_RATE_LIMIT")
                .filter(|raw| !raw.trim().is_empty())
                .map(|raw| {
                    raw.trim().parse().map_err(|p| {
                        ConfigError::new("MAIL_RATE_LIMIT", format!("`{}`: {p}", raw.trim()))
                    })
                })
                .transpose()?,
            templates_dir: env.get("TEMPLATES_DIR").map(PathBuf::from),
            worker_concurrency: env.number("WORKER_CONCURRENCY", 256, 1)?,
            worker_threads: env.worker_threads()?,
            mail_retry_window: env.seconds("MAIL_RETRY_WINDOW_SECONDS", 900, 0)?,
            gateway_addr: env.parse("GATEWAY_ADDR", parse_addr(defaults::GATEWAY_ADDR))?,
            metrics_addr: env.parse("METRICS_ADDR", parse_addr(defaults::METRICS_ADDR))?,
            gateway_metrics_addr: env
                .parse("METRICS_ADDR", parse_addr(defaults::GATEWAY_METRICS_ADDR))?,
            confirm_on_get: env.bool("CONFIRM_ON_GET", false)?,
            confirm_method: env.parse("CONFIRM_METHOD", ConfirmMethod::Both)?,
            code_length: env.code_length()?,
            code_max_attempts: env.code_max_attempts()?,
            gateway_api_keys: env.api_keys()?,
            suppress_on_reject: env.bool("SUPPRESS_ON_REJECT", true)?,
            webhook_secrets: WebhookSecrets::parse(&env.get("WEBHOOK_SECRETS").unwrap_or_default())
                .map_err(|p| ConfigError::new("WEBHOOK_SECRETS", p))?,
            confirm_rate_limit_per_minute: env.number("CONFIRM_RATE_LIMIT_PER_MINUTE", 30, 1)?,
            trusted_proxies: env.trusted_proxies()?,
            retention,
            log_format: env.log_format()?,
        })
    }

    /// The signing keys. Services that sign or verify call this at start, so a
    /// missing `VERIMAIL_SECRET_KEY` stops them; the CLI's `publish` does not need it.
    pub fn keys(&self) -> Result<Keys, ConfigError> {
        let current = self.secret_key.clone().ok_or_else(|| {
            ConfigError::new(
                "VERIMAIL_SECRET_KEY",
                "required (or name a file holding it in VERIMAIL_SECRET_KEY_FILE)",
            )
        })?;
        Ok(Keys::new(
            current,
            self.old_secret_keys.clone(),
            self.salt.clone(),
        ))
    }

    /// Whether `url` may be used as a `return_url`: its origin is allowlisted.
    pub fn return_url_allowed(&self, url: &Url) -> bool {
        self.return_url_allowlist.contains(&url.origin())
    }

    /// The link a user clicks for `token`.
    pub fn confirm_link(&self, token: &str) -> String {
        format!("{}/confirm/{token}", self.public_base_url)
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    // The defaults are literals checked by a unit test; this cannot fail for them.
    s.parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)))
}

/// A light check of `MAIL_FROM` (`addr` or `Name <addr>`); lettre does the full parse.
fn check_mailbox(raw: &str) -> Result<(), String> {
    let addr = match (raw.find('<'), raw.rfind('>')) {
        (Some(open), Some(close)) if open < close && close == raw.len() - 1 => {
            &raw[open + 1..close]
        }
        (None, None) => raw,
        _ => return Err("expected `address` or `Name <address>`".into()),
    };
    if raw.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    let (local, domain) = addr.rsplit_once('@').ok_or("the address has no @")?;
    if local.is_empty() || domain.is_empty() {
        return Err("the address needs a local part and a domain".into());
    }
    Ok(())
}

/// A URL with its password replaced, safe to log.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable URL>".into(),
    }
}

/// Reads `.env` from the working directory, if there is one; the real
/// environment wins over it. A malformed file is reported, not ignored.
pub fn load_dotenv() -> Result<(), ConfigError> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(ConfigError::new(".env", e.to_string())),
    }
}

impl Config {
    /// The `/v1/` API keys, ready for constant-time checks.
    pub fn api_keys(&self) -> crate::token::ApiKeys {
        crate::token::ApiKeys::new(&self.gateway_api_keys)
    }

    /// The current secret, for code that must hand it to a library (never log it).
    pub fn expose_current_secret(&self) -> Option<&str> {
        self.secret_key.as_ref().map(ExposeSecret::expose_secret)
    }
}

#[cfg(test)]
mod tests;
