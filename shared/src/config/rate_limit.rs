//! `MAIL_RATE_LIMIT`: at most so many mails per second or minute, across all
//! workers of the namespace (the worker keeps the budget in PostgreSQL).

use std::str::FromStr;
use std::time::Duration;

/// A mail rate, `14/s` or `600/min`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MailRateLimit {
    /// Mails allowed per period.
    pub mails: u32,
    /// The period: one second or one minute.
    pub per: Duration,
}

impl MailRateLimit {
    /// Mails per second (600/min is 10).
    pub fn per_second(self) -> f64 {
        f64::from(self.mails) / self.per.as_secs_f64()
    }

    /// The gap between two mails at this rate.
    pub fn interval(self) -> Duration {
        self.per / self.mails
    }
}

impl std::fmt::Display for MailRateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = if self.per == Duration::from_secs(60) {
            "min"
        } else {
            "s"
        };
        write!(f, "{}/{unit}", self.mails)
    }
}

impl FromStr for MailRateLimit {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        const EXPECTED: &str = "expected mails per second or minute, e.g. 14/s or 600/min";
        let (count, unit) = raw.split_once('/').ok_or(EXPECTED)?;
        let mails: u32 = count.trim().parse().map_err(|_| EXPECTED)?;
        if mails == 0 {
            return Err("must be at least 1 mail per period (unset it for no limit)".into());
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "minute" => Duration::from_secs(60),
            _ => return Err(EXPECTED.into()),
        };
        Ok(Self { mails, per })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_per_second_and_minute_parse_and_bad_ones_say_what_is_expected() {
        let r: Result<MailRateLimit, _> = "14/s".parse();
        assert_eq!(r.map(MailRateLimit::per_second), Ok(14.0));
        let r: Result<MailRateLimit, _> = "600/min".parse();
        assert_eq!(
            r.map(MailRateLimit::interval),
            Ok(Duration::from_millis(100))
        );
        for bad in ["14", "0/s", "-1/s", "1.5/s", "10/h", "x/min", ""] {
            assert!(bad.parse::<MailRateLimit>().is_err(), "{bad}");
        }
    }
}
