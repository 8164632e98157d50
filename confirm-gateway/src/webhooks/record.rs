//! Recording notices: in ONE transaction per notification, for each notice
//! the receipt (its provider key; a key seen before skips the rest), the
//! mail it concerns (our request id from the provider's metadata, the
//! provider's message id recorded at send time, or our own `Message-ID`),
//! the suppression (hard bounces and complaints) and its event in the outbox.

use sqlx::PgPool;
use time::OffsetDateTime;
use verimail_shared::events::{
    BouncedData, CloudEvent, ComplainedData, EMAIL_BOUNCED, EMAIL_COMPLAINED, MailProvider,
    NoticeData, validate_email,
};
use verimail_shared::suppression::{self, SuppressionReason};

use super::{Notice, What};
use crate::writer::EVENT_SOURCE;

/// What recording found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Notices recorded now.
    pub acted: usize,
    /// Notices seen before (no second effect).
    pub duplicates: usize,
    /// Notices whose address is not an address (nothing to suppress).
    pub unusable: usize,
}

/// Our `Message-ID` is `<{request id, sanitized}.{FNV-1a of the raw id, 16
/// hex}@{domain}>` (worker `mail::send::message_id`); the request id comes
/// back when sanitizing kept it whole, which the hash confirms.
pub fn request_of_message_id(message_id: &str) -> Option<String> {
    let inner = message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let local = inner.rsplit_once('@')?.0;
    let (id, hash) = local.rsplit_once('.')?;
    let fnv = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash.len() == 16 && format!("{fnv:016x}") == hash && !id.is_empty()).then(|| id.to_owned())
}

/// Records `notices` of `provider`, all or nothing.
pub async fn record(
    pool: &PgPool,
    provider: MailProvider,
    notices: &[Notice],
) -> Result<Counts, sqlx::Error> {
    let mut counts = Counts::default();
    if notices.is_empty() {
        return Ok(counts);
    }
    let mut tx = pool.begin().await?;
    let now = OffsetDateTime::now_utc();
    for notice in notices {
        if validate_email(&notice.email).is_err() {
            counts.unusable += 1;
            continue;
        }
        // A second delivery waits here on the first one's key, then inserts nothing.
        let first: Option<i32> = sqlx::query_scalar(
            "INSERT INTO webhook_receipts (provider, event_key) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING RETURNING 1",
        )
        .bind(provider.as_str())
        .bind(&notice.key)
        .fetch_optional(&mut *tx)
        .await?;
        if first.is_none() {
            counts.duplicates += 1;
            continue;
        }
        let mut candidates: Vec<String> = notice.request_id.iter().cloned().collect();
        candidates.extend(
            notice
                .message_ids
                .iter()
                .filter_map(|m| request_of_message_id(m)),
        );
        let provider_ids: Vec<String> = notice
            .message_ids
            .iter()
            .flat_map(|m| {
                let bare = m.trim().trim_start_matches('<').trim_end_matches('>');
                [bare.to_owned(), format!("<{bare}>")]
            })
            .collect();
        // The mail, if it went to this address: by request id first, then
        // by the provider's message id (kept in `provider_messages`; in
        // `requests.provider_message_id` by a worker of an earlier release).
        let mail: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, user_id FROM ( \
                 SELECT id, user_id, email, 0 AS rank FROM requests WHERE id = ANY($1) \
                 UNION ALL \
                 SELECT r.id, r.user_id, r.email, 1 FROM provider_messages p \
                 JOIN requests r ON r.id = p.request_id WHERE p.provider_message_id = ANY($2) \
                 UNION ALL \
                 SELECT id, user_id, email, 2 FROM requests WHERE provider_message_id = ANY($2) \
             ) m WHERE lower(m.email) = lower($3) ORDER BY rank LIMIT 1",
        )
        .bind(&candidates)
        .bind(&provider_ids)
        .bind(&notice.email)
        .fetch_optional(&mut *tx)
        .await?;
        let (request_id, user_id) = match mail {
            Some((id, user)) => (Some(id), user),
            // Named by the provider's metadata, but its record is gone (retention).
            None => (notice.request_id.clone(), None),
        };
        if notice.what.suppresses() {
            let reason = match notice.what {
                What::Complaint => SuppressionReason::Complaint,
                What::Bounce(_) => SuppressionReason::Bounce,
            };
            suppression::add(
                &mut *tx,
                &notice.email,
                reason,
                provider.as_str(),
                Some(&notice.detail),
            )
            .await?;
        }
        let occurred_at = notice.occurred_at.unwrap_or(now);
        let id = uuid::Uuid::now_v7().to_string();
        let fields = NoticeData {
            email: notice.email.clone(),
            provider,
            occurred_at,
            detail: notice.detail.clone(),
            request_id,
            user_id,
        };
        let (routing_key, body) = match notice.what {
            What::Bounce(kind) => (
                EMAIL_BOUNCED,
                CloudEvent::with_id(
                    id.clone(),
                    EMAIL_BOUNCED,
                    EVENT_SOURCE,
                    BouncedData {
                        notice: fields,
                        kind,
                    },
                )
                .to_bytes(),
            ),
            What::Complaint => (
                EMAIL_COMPLAINED,
                CloudEvent::with_id(
                    id.clone(),
                    EMAIL_COMPLAINED,
                    EVENT_SOURCE,
                    ComplainedData { notice: fields },
                )
                .to_bytes(),
            ),
        };
        sqlx::query(
            "INSERT INTO outbox (id, routing_key, body, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(routing_key)
        .bind(&body)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            event_id = %id,
            provider = provider.as_str(),
            kind = match notice.what {
                What::Bounce(k) => k.as_str(),
                What::Complaint => "complaint",
            },
            "provider notification recorded"
        );
        counts.acted += 1;
    }
    tx.commit().await?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_message_id_gives_back_a_clean_request_id() {
        // The worker's own test vector: message_id("a/b", ..) differs from "a_b".
        let id = "0193a5e2-7c1d-7000-8000-0000000000aa";
        let fnv = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mid = format!("<{id}.{fnv:016x}@example.com>");
        assert_eq!(request_of_message_id(&mid).as_deref(), Some(id));
        assert_eq!(
            request_of_message_id(mid.trim_matches(['<', '>'])).as_deref(),
            Some(id)
        );
        assert_eq!(request_of_message_id(&mid.replace("aa.", "ab.")), None);
        assert_eq!(
            request_of_message_id("<20111114174239.25659.5817@samples.mailgun.org>"),
            None
        );
    }
}
