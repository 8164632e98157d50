//! The names read from configuration: `TOKEN_FORMAT` ([`TokenFormat`]) and
//! `ITSDANGEROUS_DIGEST` ([`Digest`]), their spellings and parse errors.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The format the worker mints (`TOKEN_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenFormat {
    /// verimail's own format (see the module documentation).
    #[default]
    V1,
    /// `URLSafeTimedSerializer(SECRET).dumps(email, salt=SALT)`.
    Itsdangerous,
}

impl TokenFormat {
    /// The configuration spelling: `v1` or `itsdangerous`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::Itsdangerous => "itsdangerous",
        }
    }
}

impl fmt::Display for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TokenFormat {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(Self::V1),
            "itsdangerous" => Ok(Self::Itsdangerous),
            _ => Err(ParseNameError::new(
                "token format",
                "`v1` or `itsdangerous`",
            )),
        }
    }
}

/// The hash itsdangerous signs with (`ITSDANGEROUS_DIGEST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Digest {
    /// HMAC-SHA1 with a SHA-1 derived key: itsdangerous' default.
    #[default]
    Sha1,
    /// HMAC-SHA256 with a SHA-256 derived key.
    Sha256,
}

impl Digest {
    /// The configuration spelling: `sha1` or `sha256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
        }
    }

    pub(super) fn other(self) -> Self {
        match self {
            Self::Sha1 => Self::Sha256,
            Self::Sha256 => Self::Sha1,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Digest {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            _ => Err(ParseNameError::new("digest", "`sha1` or `sha256`")),
        }
    }
}

/// A configuration value that names no [`TokenFormat`] or [`Digest`].
///
/// The message leaves the value out: the caller names the variable and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what}, expected {expected}")]
pub struct ParseNameError {
    what: &'static str,
    expected: &'static str,
}

impl ParseNameError {
    fn new(what: &'static str, expected: &'static str) -> Self {
        Self { what, expected }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_display_as_configured() {
        assert_eq!("v1".parse(), Ok(TokenFormat::V1));
        assert_eq!("itsdangerous".parse(), Ok(TokenFormat::Itsdangerous));
        assert_eq!(TokenFormat::Itsdangerous.to_string(), "itsdangerous");
        assert_eq!("sha256".parse(), Ok(Digest::Sha256));
        assert_eq!(Digest::Sha1.to_string(), "sha1");
        let err = "SHA1".parse::<Digest>().expect_err("case matters");
        assert_eq!(
            err.to_string(),
            "unknown digest, expected `sha1` or `sha256`"
        );
        assert_eq!(
            serde_json::to_string(&TokenFormat::Itsdangerous)
                .ok()
                .as_deref(),
            Some("\"itsdangerous\"")
        );
    }
}
