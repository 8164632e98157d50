//! Reading one variable at a time: each reader turns a wrong value into a
//! [`ConfigError`] naming the variable, never its secret value.

use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::SecretString;
use url::Url;

use super::{CODE_LENGTHS, ConfigError, LogFormat, MAX_CODE_ATTEMPTS, defaults, redact};

pub(super) struct Env<'a, F: Fn(&str) -> Option<String>>(pub(super) &'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    /// A variable set to the empty string counts as unset, as in most shells' habits.
    pub(super) fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    pub(super) fn string(&self, name: &str, default: &str) -> String {
        self.get(name)
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| default.to_owned())
    }

    pub(super) fn parse<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
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

    pub(super) fn number<T>(&self, name: &'static str, default: T, min: T) -> Result<T, ConfigError>
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

    pub(super) fn seconds(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
    ) -> Result<Duration, ConfigError> {
        self.number(name, default, min).map(Duration::from_secs)
    }

    pub(super) fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
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

    pub(super) fn amqp_urls(&self) -> Result<Vec<String>, ConfigError> {
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

    pub(super) fn secret_key(&self) -> Result<Option<SecretString>, ConfigError> {
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

    pub(super) fn public_base_url(&self) -> Result<String, ConfigError> {
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

    pub(super) fn allowlist(&self) -> Result<Vec<url::Origin>, ConfigError> {
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

    pub(super) fn trusted_proxies(&self) -> Result<Vec<IpNet>, ConfigError> {
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

    pub(super) fn code_length(&self) -> Result<u8, ConfigError> {
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

    /// `WORKER_THREADS`: the worker's runtime threads. One by default: a
    /// worker waits on sockets far more than it computes, and on a machine
    /// it shares with the broker and the database a second thread mostly
    /// adds wake-ups and contention on the allocator's locks between the two
    /// (docs/performance.md); more workers, or more threads, scale it out.
    pub(super) fn worker_threads(&self) -> Result<usize, ConfigError> {
        self.number_at_most("WORKER_THREADS", 1, 1, 256, "")
    }

    pub(super) fn code_max_attempts(&self) -> Result<u32, ConfigError> {
        self.number_at_most(
            "CODE_MAX_ATTEMPTS",
            5,
            1,
            MAX_CODE_ATTEMPTS,
            ", or codes can be guessed",
        )
    }

    /// [`Self::number`], at most `max`; `why` follows the message past it.
    fn number_at_most<T>(
        &self,
        name: &'static str,
        default: T,
        min: T,
        max: T,
        why: &str,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let value = self.number(name, default, min)?;
        if value > max {
            return Err(ConfigError::new(
                name,
                format!("{value}: at most {max}{why}"),
            ));
        }
        Ok(value)
    }

    /// Comma-separated keys; each must fit an `Authorization` header and be
    /// long enough not to be guessed. An error names the key by position,
    /// never by value.
    pub(super) fn api_keys(&self) -> Result<Vec<SecretString>, ConfigError> {
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

    pub(super) fn log_format(&self) -> Result<LogFormat, ConfigError> {
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
