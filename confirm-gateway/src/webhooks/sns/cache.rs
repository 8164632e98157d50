//! The SNS signing-certificate cache: memory first, then the
//! `sns_certificates` table (shared by every gateway), then one fetch from
//! SNS, stored for the others.
//!
//! Anyone can post a notification naming any `SigningCertURL` on an SNS
//! host, so what a URL costs is bounded here:
//! - one fetch at a time per URL: notifications arriving while it is fetched
//!   wait for that fetch instead of starting their own;
//! - a URL whose fetch failed, or whose answer is not a certificate, is
//!   refused for [`NEGATIVE_TTL`] without another fetch (a database error is
//!   not the URL's fault and is not remembered);
//! - at most [`MAX_URLS`] URLs are remembered, good or failed; a new one
//!   evicts the oldest (a good certificate evicted is read back from the
//!   table, not fetched).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use url::Url;

use super::{Fetch, allowed_sns_url, der_of};

/// How long a URL whose certificate could not be had is refused without a
/// new fetch.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// The most URLs the cache remembers.
pub const MAX_URLS: usize = 1024;

/// Why a certificate is not available.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The URL is not an SNS certificate URL: the message is not authentic.
    #[error("SigningCertURL is not https://sns.<region>.amazonaws.com/….pem")]
    NotAllowed,
    /// The certificate could not be read (database, fetch, PEM): try later.
    #[error("signing certificate unavailable: {0}")]
    Unavailable(String),
}

/// Why loading a URL's certificate failed, and when.
#[derive(Debug, Clone)]
struct Failure {
    why: String,
    at: Instant,
    /// The URL's own fault (fetch, certificate): refused for [`NEGATIVE_TTL`].
    remember: bool,
}

type Loaded = Result<Arc<Vec<u8>>, Failure>;

/// One URL's result, filled once by whoever loads it first; the others wait
/// on it.
type Slot = Arc<tokio::sync::OnceCell<Loaded>>;

/// The slots by URL, and the URLs from oldest to newest (for eviction).
#[derive(Debug, Default)]
struct Slots {
    by_url: HashMap<String, Slot>,
    order: VecDeque<String>,
}

impl Slots {
    /// The slot to read or fill for `url` at `now`: the one held while it is
    /// being loaded, good, or refused within [`NEGATIVE_TTL`]; else a fresh
    /// one, evicting the oldest URL when [`MAX_URLS`] are held.
    fn slot(&mut self, url: &str, now: Instant) -> Slot {
        if let Some(slot) = self.by_url.get(url) {
            let keep = match slot.get() {
                None | Some(Ok(_)) => true,
                Some(Err(f)) => f.remember && now.saturating_duration_since(f.at) < NEGATIVE_TTL,
            };
            if keep {
                return slot.clone();
            }
            self.by_url.remove(url);
            self.order.retain(|u| u != url);
        }
        while self.by_url.len() >= MAX_URLS {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.by_url.remove(&oldest);
        }
        let slot = Slot::default();
        self.by_url.insert(url.to_owned(), slot.clone());
        self.order.push_back(url.to_owned());
        slot
    }
}

/// Signing certificates by URL (see the module docs).
#[derive(Debug)]
pub struct CertCache {
    slots: Mutex<Slots>,
    fetch: Arc<dyn Fetch>,
}

impl CertCache {
    /// A cache fetching through `fetch`.
    pub fn new(fetch: Arc<dyn Fetch>) -> Self {
        Self {
            slots: Mutex::new(Slots::default()),
            fetch,
        }
    }

    /// The fetcher (also used to confirm subscriptions).
    pub fn fetcher(&self) -> &dyn Fetch {
        &*self.fetch
    }

    /// The DER certificate behind `url`.
    pub async fn get(&self, pool: &PgPool, url: &str) -> Result<Arc<Vec<u8>>, CertError> {
        let checked = allowed_sns_url(url, true).ok_or(CertError::NotAllowed)?;
        // A poisoned lock (a panic elsewhere) only loses the sharing.
        let slot = match self.slots.lock() {
            Ok(mut slots) => slots.slot(url, Instant::now()),
            Err(_) => Slot::default(),
        };
        match slot.get_or_init(|| self.load(pool, url, checked)).await {
            Ok(der) => Ok(der.clone()),
            Err(failure) => Err(CertError::Unavailable(failure.why.clone())),
        }
    }

    /// Reads `url`'s certificate from the table, else fetches, checks and
    /// stores it.
    async fn load(&self, pool: &PgPool, url: &str, checked: Url) -> Loaded {
        let failed = |why: String, remember: bool| Failure {
            why,
            at: Instant::now(),
            remember,
        };
        let stored: Option<String> =
            sqlx::query_scalar("SELECT pem FROM sns_certificates WHERE url = $1")
                .bind(url)
                .fetch_optional(pool)
                .await
                .map_err(|e| failed(format!("database: {e}"), false))?;
        if let Some(pem) = stored {
            return der_of(&pem).map(Arc::new).map_err(|e| failed(e, true));
        }
        let body = self.fetch.get(checked).await.map_err(|e| failed(e, true))?;
        let pem = String::from_utf8(body)
            .map_err(|_| failed("the certificate is not PEM".into(), true))?;
        // Checked before it is shared with the other gateways.
        let der = der_of(&pem).map_err(|e| failed(e, true))?;
        sqlx::query(
            "INSERT INTO sns_certificates (url, pem) VALUES ($1, $2) ON CONFLICT (url) DO NOTHING",
        )
        .bind(url)
        .bind(&pem)
        .execute(pool)
        .await
        .map_err(|e| failed(format!("database: {e}"), false))?;
        tracing::info!(url, "fetched an SNS signing certificate");
        Ok(Arc::new(der))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(slot: &Slot, at: Instant, remember: bool) {
        let _ = slot.set(Err(Failure {
            why: "no".into(),
            at,
            remember,
        }));
    }

    #[test]
    fn a_failed_url_keeps_its_slot_for_the_negative_ttl_only() {
        let mut slots = Slots::default();
        let t0 = Instant::now();
        let first = slots.slot("a", t0);
        fail(&first, t0, true);
        let again = slots.slot("a", t0 + NEGATIVE_TTL - Duration::from_millis(1));
        assert!(Arc::ptr_eq(&first, &again), "still refused");
        let later = slots.slot("a", t0 + NEGATIVE_TTL);
        assert!(!Arc::ptr_eq(&first, &later), "tried again");
        assert!(later.get().is_none());
        assert_eq!((slots.by_url.len(), slots.order.len()), (1, 1));
    }

    #[test]
    fn a_database_failure_is_not_remembered() {
        let mut slots = Slots::default();
        let t0 = Instant::now();
        let first = slots.slot("a", t0);
        fail(&first, t0, false);
        assert!(!Arc::ptr_eq(&first, &slots.slot("a", t0)));
    }

    #[test]
    fn the_cache_holds_at_most_max_urls_and_evicts_the_oldest() {
        let mut slots = Slots::default();
        let t0 = Instant::now();
        let oldest = slots.slot("u0", t0);
        let _ = oldest.set(Ok(Arc::new(vec![1])));
        for i in 1..MAX_URLS {
            slots.slot(&format!("u{i}"), t0);
        }
        assert_eq!(slots.by_url.len(), MAX_URLS);
        assert!(Arc::ptr_eq(&oldest, &slots.slot("u0", t0)), "still held");
        slots.slot("one-more", t0);
        assert_eq!(slots.by_url.len(), MAX_URLS);
        assert_eq!(slots.order.len(), MAX_URLS);
        assert!(!slots.by_url.contains_key("u0"), "the oldest went");
        assert!(slots.by_url.contains_key("u1"));
    }
}
