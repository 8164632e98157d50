//! The suppression list: addresses that must not be mailed (issue 17).
//!
//! One entry per address, compared case-insensitively (`lower(email)`, the
//! unique index of migration 18). The gateway adds entries from provider
//! bounces and complaints and through `/v1/suppressions`, the worker from a
//! permanent refusal of the recipient (`SUPPRESS_ON_REJECT`) and checks the
//! list inside its claim statement, and `verimail suppression` reads and edits
//! it. Retention never deletes an entry.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::events::rfc3339;

/// Why an address is suppressed (`reason` of an entry, and the `detail` of
/// the `failed`/`suppressed` outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// A provider reported a hard bounce.
    Bounce,
    /// The recipient reported the mail as spam.
    Complaint,
    /// The mail server refused the recipient for good at send time.
    RecipientRejected,
    /// An operator added it.
    Manual,
}

impl SuppressionReason {
    /// Every reason, for metrics.
    pub const ALL: [Self; 4] = [
        Self::Bounce,
        Self::Complaint,
        Self::RecipientRejected,
        Self::Manual,
    ];

    /// The contract's spelling (`recipient_rejected`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bounce => "bounce",
            Self::Complaint => "complaint",
            Self::RecipientRejected => "recipient_rejected",
            Self::Manual => "manual",
        }
    }
}

impl fmt::Display for SuppressionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SuppressionReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown reason `{s}` (expected bounce, complaint, recipient_rejected or manual)")
            })
    }
}

/// One entry of the list, as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    /// The address (as first seen; compared case-insensitively).
    pub email: String,
    /// Why.
    pub reason: SuppressionReason,
    /// Who added it: a provider, `worker`, `api` or `cli`.
    pub source: String,
    /// When.
    #[serde(with = "rfc3339")]
    pub created_at: OffsetDateTime,
    /// The provider's, mail server's or operator's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[cfg(feature = "db")]
pub use db::*;

#[cfg(feature = "db")]
mod db {
    use super::{Suppression, SuppressionReason};

    type Row = (String, String, String, time::OffsetDateTime, Option<String>);

    fn entry((email, reason, source, created_at, detail): Row) -> Result<Suppression, sqlx::Error> {
        Ok(Suppression {
            email,
            reason: reason
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            source,
            created_at,
            detail,
        })
    }

    /// The entry for `email` (any case), if suppressed.
    pub async fn find(
        conn: impl sqlx::PgExecutor<'_>,
        email: &str,
    ) -> Result<Option<Suppression>, sqlx::Error> {
        let row: Option<Row> = sqlx::query_as(
            "SELECT email, reason, source, created_at, detail FROM suppressions \
             WHERE lower(email) = lower($1)",
        )
        .bind(email)
        .fetch_optional(conn)
        .await?;
        row.map(entry).transpose()
    }

    /// Every entry, oldest first (or only `email`'s).
    pub async fn list(
        conn: impl sqlx::PgExecutor<'_>,
        email: Option<&str>,
    ) -> Result<Vec<Suppression>, sqlx::Error> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT email, reason, source, created_at, detail FROM suppressions \
             WHERE $1::text IS NULL OR lower(email) = lower($1) \
             ORDER BY created_at, lower(email)",
        )
        .bind(email)
        .fetch_all(conn)
        .await?;
        rows.into_iter().map(entry).collect()
    }

    /// Suppresses `email` unless it already is (the first reason stays: a
    /// later bounce of a manually suppressed address changes nothing);
    /// returns the entry as it now stands and whether this call added it.
    pub async fn add(
        conn: impl sqlx::PgExecutor<'_>,
        email: &str,
        reason: SuppressionReason,
        source: &str,
        detail: Option<&str>,
    ) -> Result<(Suppression, bool), sqlx::Error> {
        // The no-op update makes RETURNING give the existing row too, in
        // one statement (no read-then-write race between gateways).
        let row: (
            String,
            String,
            String,
            time::OffsetDateTime,
            Option<String>,
            bool,
        ) = sqlx::query_as(
            "INSERT INTO suppressions (email, reason, source, detail) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT ((lower(email))) DO UPDATE SET email = suppressions.email \
                 RETURNING email, reason, source, created_at, detail, (xmax = 0)",
        )
        .bind(email)
        .bind(reason.as_str())
        .bind(source)
        .bind(detail)
        .fetch_one(conn)
        .await?;
        let (email, reason, source, created_at, detail, inserted) = row;
        Ok((
            entry((email, reason, source, created_at, detail))?,
            inserted,
        ))
    }

    /// Lifts the suppression of `email` (any case); false when it was not there.
    pub async fn remove(conn: impl sqlx::PgExecutor<'_>, email: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM suppressions WHERE lower(email) = lower($1)")
            .bind(email)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Entries per reason (every reason listed, zero included), for `/metrics`.
    pub async fn count_by_reason(
        conn: impl sqlx::PgExecutor<'_>,
    ) -> Result<Vec<(SuppressionReason, i64)>, sqlx::Error> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT reason, count(*) FROM suppressions GROUP BY reason")
                .fetch_all(conn)
                .await?;
        Ok(SuppressionReason::ALL
            .into_iter()
            .map(|r| {
                let n = rows
                    .iter()
                    .find(|(name, _)| name == r.as_str())
                    .map_or(0, |(_, n)| *n);
                (r, n)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_their_contract_spelling() {
        for r in SuppressionReason::ALL {
            assert_eq!(r.as_str().parse::<SuppressionReason>(), Ok(r));
        }
        assert!("Bounce".parse::<SuppressionReason>().is_err());
        assert!("spam".parse::<SuppressionReason>().is_err());
    }
}
