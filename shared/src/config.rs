//! Configuration from the environment, exactly the variables of `CONTRACT.md`.
//!
//! Every binary calls [`Config::from_env`] once at start. A wrong value stops the
//! program with one line naming the variable ([`ConfigError`]'s `Display`), so an
//! operator never has to guess which of twenty variables is at fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::token::{Digest, Keys, TokenFormat};

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

/// How the worker delivers mail, parsed from `MAIL_URL`.
#[derive(Clone)]
pub enum MailUrl {
    /// `smtp://`, `smtps://` or `smtp+plain://`.
    Smtp {
        /// Which kind of TLS the connection uses.
        security: SmtpSecurity,
        /// Server host name or address.
        host: String,
        /// Server port (25 for `smtp`/`smtp+plain`, 465 for `smtps` when absent).
        port: u16,
        /// `user:pass` from the URL, percent-decoded.
        credentials: Option<(String, SecretString)>,
    },
    /// `file://DIR`: one `.eml` file per mail.
    File(PathBuf),
}

impl std::fmt::Debug for MailUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Smtp {
                security,
                host,
                port,
                credentials,
            } => f
                .debug_struct("Smtp")
                .field("security", security)
                .field("host", host)
                .field("port", port)
                .field("user", &credentials.as_ref().map(|(u, _)| u))
                .finish_non_exhaustive(),
            Self::File(dir) => f.debug_tuple("File").field(dir).finish(),
        }
    }
}

/// TLS on an SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// `smtp://`: STARTTLS when the server offers it.
    Opportunistic,
    /// `smtps://`: TLS from the first byte.
    Implicit,
    /// `smtp+plain://`: never TLS (local sinks and tests).
    None,
}

impl FromStr for MailUrl {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if let Some(dir) = raw.strip_prefix("file://") {
            if dir.is_empty() {
                return Err("file:// needs a directory, e.g. file://./outbox".into());
            }
            return Ok(Self::File(PathBuf::from(dir)));
        }
        // The contract's HTTP API targets (`postmark://TOKEN@` is no valid URL
        // to the parser): say plainly that this build lacks them rather than
        // calling a documented scheme unknown.
        if let Some((api @ ("ses" | "postmark" | "sendgrid" | "mailgun" | "https" | "http"), _)) =
            raw.split_once("://")
        {
            return Err(format!(
                "`{api}://` (delivery through an HTTP API) is not built into this \
                 version yet; use smtp, smtps, smtp+plain or file"
            ));
        }
        let url = Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        let (security, default_port) = match url.scheme() {
            "smtp" => (SmtpSecurity::Opportunistic, 25),
            "smtps" => (SmtpSecurity::Implicit, 465),
            "smtp+plain" => (SmtpSecurity::None, 25),
            other => {
                return Err(format!(
                    "unknown scheme `{other}` (expected smtp, smtps, smtp+plain or file)"
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let credentials = if url.username().is_empty() {
            None
        } else {
            let user = percent_decode(url.username())?;
            let pass = percent_decode(url.password().unwrap_or(""))?;
            Some((user, SecretString::from(pass)))
        };
        Ok(Self::Smtp {
            security,
            host,
            port: url.port().unwrap_or(default_port),
            credentials,
        })
    }
}

/// The name of a request's mail in a `file://` outbox: `{request_id}.eml`.
///
/// What a file name cannot hold is percent-encoded (`/`, `\\`, `%`, control
/// characters, a leading `.`), so every id gets a file of its own inside the
/// folder and the worker and `verimail outbox` agree on it. An id too long for
/// a file name keeps its first 200 bytes and gains a hash of the whole.
pub fn outbox_file_name(request_id: &str) -> String {
    let mut name = String::with_capacity(request_id.len() + 4);
    for (i, c) in request_id.char_indices() {
        if matches!(c, '/' | '\\' | '%') || c.is_control() || (i == 0 && c == '.') {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                name.push_str(&format!("%{b:02X}"));
            }
        } else {
            name.push(c);
        }
    }
    if name.len() > 240 {
        let mut cut = 200;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        // FNV-1a: stable across Rust versions, unlike std's hasher.
        let hash = request_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        name = format!("{}~{hash:016x}", &name[..cut]);
    }
    name.push_str(".eml");
    name
}

/// Decodes the `user` or `pass` of a mail URL, which `url` hands over still
/// percent-encoded. Stricter than [`percent_encoding::percent_decode_str`],
/// which passes a malformed `%` through: a `%` not followed by two hex digits
/// is an error here, as a typo in a password should be.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err("bad percent-encoding in credentials".into());
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| "credentials are not UTF-8".into())
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
    /// Folder of templates overriding the built-in ones (`TEMPLATES_DIR`).
    pub templates_dir: Option<PathBuf>,
    /// Messages in flight per worker (`WORKER_CONCURRENCY`).
    pub worker_concurrency: u16,
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
    pub webhook_secrets: crate::webhooks::WebhookSecrets,
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
            templates_dir: env.get("TEMPLATES_DIR").map(PathBuf::from),
            worker_concurrency: env.number("WORKER_CONCURRENCY", 256, 1)?,
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
            webhook_secrets: crate::webhooks::WebhookSecrets::parse(
                &env.get("WEBHOOK_SECRETS").unwrap_or_default(),
            )
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

struct Env<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    /// A variable set to the empty string counts as unset, as in most shells' habits.
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.get(name)
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| default.to_owned())
    }

    fn parse<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(name, format!("`{}`: {e}", raw.trim()))),
        }
    }

    fn number<T>(&self, name: &'static str, default: T, min: T) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let value = match self.get(name) {
            None => default,
            Some(raw) => raw.trim().parse().map_err(|_| {
                ConfigError::new(name, format!("`{}` is not a whole number", raw.trim()))
            })?,
        };
        if value < min {
            return Err(ConfigError::new(name, format!("must be at least {min}")));
        }
        Ok(value)
    }

    fn seconds(&self, name: &'static str, default: u64, min: u64) -> Result<Duration, ConfigError> {
        self.number(name, default, min).map(Duration::from_secs)
    }

    fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(
                    name,
                    format!("`{v}` is not a boolean (true or false)"),
                )),
            },
        }
    }

    fn amqp_urls(&self) -> Result<Vec<String>, ConfigError> {
        let raw = self.string("AMQP_URL", defaults::AMQP_URL);
        let urls: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(ConfigError::new("AMQP_URL", "names no URL"));
        }
        for url in &urls {
            let parsed = Url::parse(url).map_err(|e| {
                ConfigError::new("AMQP_URL", format!("`{}` is not a URL ({e})", redact(url)))
            })?;
            if !matches!(parsed.scheme(), "amqp" | "amqps") || parsed.host_str().is_none() {
                return Err(ConfigError::new(
                    "AMQP_URL",
                    format!(
                        "`{}` must be amqp://host... or amqps://host...",
                        redact(url)
                    ),
                ));
            }
        }
        Ok(urls)
    }

    fn secret_key(&self) -> Result<Option<SecretString>, ConfigError> {
        if let Some(key) = (self.0)("VERIMAIL_SECRET_KEY").filter(|k| !k.is_empty()) {
            return Ok(Some(SecretString::from(key)));
        }
        let Some(path) = self.get("VERIMAIL_SECRET_KEY_FILE") else {
            return Ok(None);
        };
        let content = std::fs::read_to_string(path.trim()).map_err(|e| {
            ConfigError::new(
                "VERIMAIL_SECRET_KEY_FILE",
                format!("cannot read `{}`: {e}", path.trim()),
            )
        })?;
        let key = content
            .strip_suffix("\r\n")
            .or_else(|| content.strip_suffix('\n'))
            .unwrap_or(&content);
        if key.is_empty() {
            return Err(ConfigError::new(
                "VERIMAIL_SECRET_KEY_FILE",
                format!("`{}` is empty", path.trim()),
            ));
        }
        Ok(Some(SecretString::from(key.to_owned())))
    }

    fn public_base_url(&self) -> Result<String, ConfigError> {
        let raw = self.string("PUBLIC_BASE_URL", defaults::PUBLIC_BASE_URL);
        let url = Url::parse(&raw)
            .map_err(|e| ConfigError::new("PUBLIC_BASE_URL", format!("`{raw}`: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
            return Err(ConfigError::new(
                "PUBLIC_BASE_URL",
                "must be an http(s) URL without a query, e.g. https://verify.example.com",
            ));
        }
        Ok(raw.trim_end_matches('/').to_owned())
    }

    fn allowlist(&self) -> Result<Vec<url::Origin>, ConfigError> {
        let Some(raw) = self.get("RETURN_URL_ALLOWLIST") else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(|o| {
                let url = Url::parse(o).map_err(|e| {
                    ConfigError::new(
                        "RETURN_URL_ALLOWLIST",
                        format!("`{o}` is not an origin ({e})"),
                    )
                })?;
                if !matches!(url.scheme(), "http" | "https")
                    || url.path() != "/"
                    || url.query().is_some()
                {
                    return Err(ConfigError::new(
                        "RETURN_URL_ALLOWLIST",
                        format!("`{o}` must be an origin like https://app.example.com"),
                    ));
                }
                Ok(url.origin())
            })
            .collect()
    }

    fn trusted_proxies(&self) -> Result<Vec<IpNet>, ConfigError> {
        let Some(raw) = self.get("TRUSTED_PROXIES") else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        ConfigError::new(
                            "TRUSTED_PROXIES",
                            format!("`{p}` is neither an IP address nor a CIDR"),
                        )
                    })
            })
            .collect()
    }

    fn code_length(&self) -> Result<u8, ConfigError> {
        let length: u8 = self
            .number("CODE_LENGTH", 6, 0)
            .map_err(|_| ConfigError::new("CODE_LENGTH", "must be a whole number from 6 to 10"))?;
        if !CODE_LENGTHS.contains(&length) {
            return Err(ConfigError::new(
                "CODE_LENGTH",
                format!("{length} digits: must be 6 to 10"),
            ));
        }
        Ok(length)
    }

    fn code_max_attempts(&self) -> Result<u32, ConfigError> {
        let attempts: u32 = self.number("CODE_MAX_ATTEMPTS", 5, 1)?;
        if attempts > MAX_CODE_ATTEMPTS {
            return Err(ConfigError::new(
                "CODE_MAX_ATTEMPTS",
                format!("{attempts}: at most {MAX_CODE_ATTEMPTS}, or codes can be guessed"),
            ));
        }
        Ok(attempts)
    }

    /// Comma-separated keys; each must fit an `Authorization` header and be
    /// long enough not to be guessed. An error names the key by position,
    /// never by value.
    fn api_keys(&self) -> Result<Vec<SecretString>, ConfigError> {
        const MIN_KEY_LEN: usize = 16;
        let Some(raw) = self.get("GATEWAY_API_KEYS") else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .enumerate()
            .map(|(i, key)| {
                let n = i + 1;
                if !key.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        "GATEWAY_API_KEYS",
                        format!("key {n} holds a space or a character outside printable ASCII"),
                    ));
                }
                if key.len() < MIN_KEY_LEN {
                    return Err(ConfigError::new(
                        "GATEWAY_API_KEYS",
                        format!(
                            "key {n} has {} characters: at least {MIN_KEY_LEN} are needed",
                            key.len()
                        ),
                    ));
                }
                Ok(SecretString::from(key.to_owned()))
            })
            .collect()
    }

    fn log_format(&self) -> Result<LogFormat, ConfigError> {
        match self
            .get("LOG_FORMAT")
            .map(|v| v.trim().to_ascii_lowercase())
        {
            None => Ok(LogFormat::default()),
            Some(v) if v == "json" => Ok(LogFormat::Json),
            Some(v) if v == "pretty" => Ok(LogFormat::Pretty),
            Some(v) => Err(ConfigError::new(
                "LOG_FORMAT",
                format!("`{v}` (expected json or pretty)"),
            )),
        }
    }
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
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_contract() -> Result<(), ConfigError> {
        let c = config(&[])?;
        assert_eq!(c.amqp_urls, vec![defaults::AMQP_URL.to_owned()]);
        assert_eq!(c.database_url, defaults::DATABASE_URL);
        assert!(c.auto_migrate);
        assert_eq!(c.namespace, "verimail");
        assert_eq!(c.salt, "email-confirm");
        assert_eq!(c.token_format, TokenFormat::V1);
        assert!(!c.accept_itsdangerous);
        assert_eq!(c.itsdangerous_digest, Digest::Sha1);
        assert_eq!(c.token_ttl, Duration::from_secs(3600));
        assert_eq!(c.throttle, Duration::from_secs(60));
        assert_eq!(c.public_base_url, "http://127.0.0.1:8080");
        assert!(c.return_url_allowlist.is_empty());
        assert!(matches!(&c.mail_url, MailUrl::File(d) if d == &PathBuf::from("./outbox")));
        assert!(c.mail_url_is_default);
        assert_eq!(c.mail_from, "verimail <no-reply@localhost>");
        assert_eq!(c.worker_concurrency, 256);
        assert_eq!(c.mail_retry_window, Duration::from_secs(900));
        assert_eq!(c.gateway_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(c.gateway_metrics_addr.to_string(), "127.0.0.1:9465");
        assert_eq!(c.confirm_rate_limit_per_minute, 30);
        assert!(!c.confirm_on_get);
        assert_eq!(c.confirm_method, ConfirmMethod::Both);
        assert_eq!(c.code_length, 6);
        assert_eq!(c.code_max_attempts, 5);
        assert!(c.gateway_api_keys.is_empty());
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(c.retention, Duration::from_secs(168 * 3600));
        Ok(())
    }

    #[test]
    fn code_settings_are_read_and_bounded() -> Result<(), ConfigError> {
        let c = config(&[
            ("CONFIRM_METHOD", "Code"),
            ("CODE_LENGTH", "10"),
            ("CODE_MAX_ATTEMPTS", "3"),
            (
                "GATEWAY_API_KEYS",
                " key-one-0123456789 , ,key-two-0123456789",
            ),
        ])?;
        assert_eq!(c.confirm_method, ConfirmMethod::Code);
        assert!(c.confirm_method.mails_code() && !c.confirm_method.mails_link());
        assert!(ConfirmMethod::Both.mails_code() && ConfirmMethod::Both.mails_link());
        assert!(!ConfirmMethod::Link.mails_code());
        assert_eq!(c.code_length, 10);
        assert_eq!(c.code_max_attempts, 3);
        let keys: Vec<&str> = c
            .gateway_api_keys
            .iter()
            .map(ExposeSecret::expose_secret)
            .collect();
        assert_eq!(keys, ["key-one-0123456789", "key-two-0123456789"]);
        assert_eq!(config(&[("CODE_LENGTH", "6")])?.code_length, 6);
        Ok(())
    }

    #[test]
    fn a_bad_api_key_is_named_by_position_never_by_value() {
        let line = config(&[("GATEWAY_API_KEYS", "a-long-enough-key-1,tiny-secret")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(line.starts_with("GATEWAY_API_KEYS: key 2 "), "{line}");
        assert!(!line.contains("tiny-secret"), "{line}");
        let line = config(&[("CODE_LENGTH", "12")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(line, "CODE_LENGTH: 12 digits: must be 6 to 10");
    }

    #[test]
    fn metrics_addr_when_set_serves_the_gateway_too() -> Result<(), ConfigError> {
        let c = config(&[("METRICS_ADDR", "0.0.0.0:9999")])?;
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9999");
        assert_eq!(c.gateway_metrics_addr.to_string(), "0.0.0.0:9999");
        Ok(())
    }

    #[test]
    fn a_missing_secret_is_named_when_keys_are_needed() -> Result<(), ConfigError> {
        let c = config(&[])?;
        let err = c.keys().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("VERIMAIL_SECRET_KEY: required"), "{err}");
        Ok(())
    }

    #[test]
    fn itsdangerous_minting_turns_on_accepting_it() -> Result<(), ConfigError> {
        assert!(config(&[("TOKEN_FORMAT", "itsdangerous")])?.accept_itsdangerous);
        assert!(
            !config(&[
                ("TOKEN_FORMAT", "itsdangerous"),
                ("ACCEPT_ITSDANGEROUS", "false")
            ])?
            .accept_itsdangerous
        );
        Ok(())
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            ("AMQP_URL", "http://x"),
            ("VERIMAIL_AUTO_MIGRATE", "maybe"),
            ("VERIMAIL_NAMESPACE", "a b"),
            ("TOKEN_FORMAT", "jwt"),
            ("ACCEPT_ITSDANGEROUS", "2"),
            ("ITSDANGEROUS_DIGEST", "md5"),
            ("TOKEN_TTL_SECONDS", "-1"),
            ("TOKEN_TTL_SECONDS", "0"),
            ("THROTTLE_SECONDS", "soon"),
            ("PUBLIC_BASE_URL", "ftp://x"),
            ("RETURN_URL_ALLOWLIST", "https://app.example.com/path"),
            ("MAIL_URL", "imap://x"),
            ("MAIL_FROM", "nobody"),
            ("WORKER_CONCURRENCY", "0"),
            ("MAIL_RETRY_WINDOW_SECONDS", "x"),
            ("GATEWAY_ADDR", "localhost"),
            ("METRICS_ADDR", "9464"),
            ("CONFIRM_RATE_LIMIT_PER_MINUTE", "0"),
            ("CONFIRM_ON_GET", "maybe"),
            ("CONFIRM_METHOD", "sms"),
            ("CODE_LENGTH", "5"),
            ("CODE_LENGTH", "11"),
            ("CODE_LENGTH", "six"),
            ("CODE_MAX_ATTEMPTS", "0"),
            ("CODE_MAX_ATTEMPTS", "1001"),
            ("GATEWAY_API_KEYS", "short"),
            ("GATEWAY_API_KEYS", "a-long-enough-key-1,has a space in it!"),
            ("TRUSTED_PROXIES", "10.0.0.0/33"),
            ("RETENTION_HOURS", "1"),
            ("LOG_FORMAT", "xml"),
            ("VERIMAIL_SECRET_KEY_FILE", "/nonexistent/verimail-key"),
        ];
        for (name, value) in cases {
            let err = config(&[(name, value)]).err();
            let line = err.as_ref().map(ToString::to_string).unwrap_or_default();
            assert!(
                line.starts_with(&format!("{name}: ")),
                "{name}={value} gave {line:?}"
            );
            assert!(!line.contains('\n'), "one line: {line:?}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() -> Result<(), ConfigError> {
        let c = config(&[
            ("VERIMAIL_SECRET_KEY", "hunter2-very-secret"),
            ("VERIMAIL_OLD_SECRET_KEYS", "old-secret-1,old-secret-2"),
            ("GATEWAY_API_KEYS", "api-key-secret-0123456789"),
            ("MAIL_URL", "smtp://user:mail-password@smtp.example.com:587"),
        ])?;
        let debug = format!("{c:?}");
        for secret in [
            "hunter2-very-secret",
            "old-secret-1",
            "mail-password",
            "api-key-secret",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        Ok(())
    }

    #[test]
    fn the_secret_file_loses_its_trailing_newline() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::env::temp_dir().join(format!("verimail-key-{}", std::process::id()));
        std::fs::write(&path, "from-a-file\n")?;
        let c = config(&[(
            "VERIMAIL_SECRET_KEY_FILE",
            path.to_str().unwrap_or_default(),
        )])?;
        std::fs::remove_file(&path)?;
        assert_eq!(c.expose_current_secret(), Some("from-a-file"));
        Ok(())
    }

    #[test]
    fn http_api_mail_urls_say_they_are_not_built_yet() {
        for raw in [
            "ses://eu-west-1",
            "postmark://token@",
            "https://relay.example.com/mail",
        ] {
            let err = raw.parse::<MailUrl>().err().unwrap_or_default();
            assert!(err.contains("not built into this version"), "{raw}: {err}");
        }
    }

    #[test]
    fn mail_urls_of_every_scheme_parse() -> Result<(), String> {
        let smtp: MailUrl = "smtp://u%40x:p%2Cw@mail.example.com:587".parse()?;
        match smtp {
            MailUrl::Smtp {
                security,
                host,
                port,
                credentials,
            } => {
                assert_eq!(security, SmtpSecurity::Opportunistic);
                assert_eq!(host, "mail.example.com");
                assert_eq!(port, 587);
                let (user, pass) = credentials.ok_or("no credentials")?;
                assert_eq!(user, "u@x");
                assert_eq!(pass.expose_secret(), "p,w");
            }
            MailUrl::File(_) => return Err("expected smtp".into()),
        }
        assert!(matches!(
            "smtps://mail.example.com".parse::<MailUrl>()?,
            MailUrl::Smtp {
                security: SmtpSecurity::Implicit,
                port: 465,
                ..
            }
        ));
        assert!(matches!(
            "smtp+plain://127.0.0.1:2525".parse::<MailUrl>()?,
            MailUrl::Smtp {
                security: SmtpSecurity::None,
                port: 2525,
                ..
            }
        ));
        Ok(())
    }

    #[test]
    fn several_amqp_urls_name_a_cluster() -> Result<(), ConfigError> {
        let c = config(&[(
            "AMQP_URL",
            "amqp://g:g@127.0.0.1:5673/%2f, amqp://g:g@127.0.0.1:5674/%2f",
        )])?;
        assert_eq!(c.amqp_urls.len(), 2);
        Ok(())
    }

    #[test]
    fn return_urls_are_checked_by_origin() -> Result<(), Box<dyn std::error::Error>> {
        let c = config(&[("RETURN_URL_ALLOWLIST", "https://app.example.com")])?;
        assert!(c.return_url_allowed(&Url::parse("https://app.example.com/welcome?x=1")?));
        assert!(!c.return_url_allowed(&Url::parse("https://app.example.com.evil.io/")?));
        assert!(!c.return_url_allowed(&Url::parse("http://app.example.com/")?));
        Ok(())
    }

    #[test]
    fn outbox_file_names_are_the_request_id_kept_inside_the_folder() {
        assert_eq!(outbox_file_name("01a2-b_c.d"), "01a2-b_c.d.eml");
        assert_eq!(outbox_file_name("signup/42%"), "signup%2F42%25.eml");
        assert_eq!(outbox_file_name(".."), "%2E..eml");
        assert_eq!(outbox_file_name("邮件"), "邮件.eml");
        let long = outbox_file_name(&"é".repeat(128));
        assert!(long.len() <= 255 && long.ends_with(".eml"), "{long}");
        assert_ne!(long, outbox_file_name(&format!("{}x", "é".repeat(127))));
    }

    #[test]
    fn credentials_are_percent_decoded_strictly() {
        assert_eq!(percent_decode("u%40x").as_deref(), Ok("u@x"));
        assert_eq!(percent_decode("%E9t%C3%A9").ok(), None, "not UTF-8");
        assert_eq!(percent_decode("%C3%A9t%C3%A9").as_deref(), Ok("été"));
        assert_eq!(percent_decode("plain").as_deref(), Ok("plain"));
        for bad in ["%", "a%4", "%zz", "%+1", "50%"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
        assert!("smtp://u:p%zz@mail.example.com".parse::<MailUrl>().is_err());
    }
}
