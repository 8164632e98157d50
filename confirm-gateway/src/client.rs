//! Who is asking: the client address behind trusted proxies, and the per-client
//! token bucket of `/confirm` (`CONFIRM_RATE_LIMIT_PER_MINUTE`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Most buckets kept at once; beyond it, idle (full) buckets are evicted.
pub const MAX_BUCKETS: usize = 65_536;

/// The client address: the TCP peer, unless the peer is a trusted proxy, in
/// which case `X-Forwarded-For` is read from the right, skipping trusted
/// proxies, and the first address that is not one is the client. An entry
/// that does not parse stops the walk at the last trusted hop (a client may
/// write anything on the left of that header, never on its right).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<&str> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        hops.extend(text.split(','));
    }
    let mut current = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            return current;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        current = ip;
    }
    current
}

/// `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]`, `1.2.3.4:5678`, `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

/// The bucket key: IPv4 addresses as they are, IPv6 by their /64 (one
/// subscriber usually holds a whole /64, so single addresses would be free).
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A token bucket per client: `capacity` requests, refilled evenly over a minute.
#[derive(Debug)]
pub struct RateLimiter {
    capacity: f64,
    per_second: f64,
    max_buckets: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// What the limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead (a token was taken).
    Allow,
    /// Refused; whole seconds until a token is back (≥ 1).
    Limit {
        /// `Retry-After`.
        retry_after: u64,
    },
}

impl RateLimiter {
    /// `per_minute` requests per client per minute (at least 1).
    pub fn new(per_minute: u32) -> Self {
        Self::with_max_buckets(per_minute, MAX_BUCKETS)
    }

    /// Like [`RateLimiter::new`] with a chosen bound on tracked clients.
    pub fn with_max_buckets(per_minute: u32, max_buckets: usize) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Self {
            capacity,
            per_second: capacity / 60.0,
            max_buckets: max_buckets.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip` at `now`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Decision {
        let key = bucket_key(ip);
        // A poisoned lock only means another request panicked mid-update; the
        // map itself is still sound.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !buckets.contains_key(&key) && buckets.len() >= self.max_buckets {
            self.evict_idle(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Decision::Allow
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_second;
            // `wait` is at most 60 s (one token at capacity/60 per second).
            let secs = wait.ceil().clamp(1.0, 3600.0) as u64;
            Decision::Limit { retry_after: secs }
        }
    }

    /// Drops buckets that have refilled completely (their clients are idle:
    /// a fresh bucket would be the same). If every client is active, the
    /// oldest half goes: memory stays bounded, at the price of forgiving some.
    fn evict_idle(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let full_after = Duration::from_secs_f64(self.capacity / self.per_second);
        buckets.retain(|_, b| {
            let idle = now.saturating_duration_since(b.updated);
            b.tokens + idle.as_secs_f64() * self.per_second < self.capacity && idle < full_after
        });
        if buckets.len() >= self.max_buckets {
            let mut ages: Vec<Instant> = buckets.values().map(|b| b.updated).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            buckets.retain(|_, b| b.updated > cutoff);
            tracing::warn!(
                kept = buckets.len(),
                "rate limiter full of active clients: forgot the older half"
            );
        }
    }

    /// How many clients are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().filter_map(|s| s.parse().ok()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.append("x-forwarded-for", v);
            }
        }
        h
    }

    #[test]
    fn the_header_is_ignored_from_an_untrusted_peer() {
        let h = xff(&["1.1.1.1"]);
        assert_eq!(
            client_ip(ip("9.9.9.9"), &h, &nets(&["10.0.0.0/8"])),
            ip("9.9.9.9")
        );
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &[]), ip("9.9.9.9"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8", "192.168.1.1/32"]);
        let h = xff(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(client_ip(ip("192.168.1.1"), &h, &trusted), ip("1.2.3.4"));
        // A spoofed left part never wins.
        let h = xff(&["spoofed, 1.2.3.4"]);
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &trusted), ip("1.2.3.4"));
        // Garbage right of the last trusted hop: the trusted hop itself.
        let h = xff(&["1.2.3.4, garbage"]);
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &trusted), ip("10.1.1.1"));
        // Only proxies: the left-most one.
        let h = xff(&["10.0.0.9, 10.0.0.8"]);
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &trusted), ip("10.0.0.9"));
        // No header: the peer.
        assert_eq!(
            client_ip(ip("10.1.1.1"), &HeaderMap::new(), &trusted),
            ip("10.1.1.1")
        );
        // Ports and brackets.
        let h = xff(&["[2001:db8::1]:443"]);
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &trusted), ip("2001:db8::1"));
    }

    #[test]
    fn a_bucket_allows_its_capacity_then_says_when_to_retry() {
        let limiter = RateLimiter::new(3);
        let now = Instant::now();
        let a = ip("1.2.3.4");
        for _ in 0..3 {
            assert_eq!(limiter.check(a, now), Decision::Allow);
        }
        // 3 per minute: one token every 20 s.
        assert_eq!(limiter.check(a, now), Decision::Limit { retry_after: 20 });
        assert_eq!(
            limiter.check(a, now + Duration::from_secs(15)),
            Decision::Limit { retry_after: 5 }
        );
        assert_eq!(
            limiter.check(a, now + Duration::from_secs(20)),
            Decision::Allow
        );
        // Another client is not affected.
        assert_eq!(limiter.check(ip("1.2.3.5"), now), Decision::Allow);
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let limiter = RateLimiter::new(1);
        let now = Instant::now();
        assert_eq!(limiter.check(ip("2001:db8::1"), now), Decision::Allow);
        assert!(matches!(
            limiter.check(ip("2001:db8::2"), now),
            Decision::Limit { .. }
        ));
        assert_eq!(limiter.check(ip("2001:db8:0:1::1"), now), Decision::Allow);
    }

    #[test]
    fn memory_stays_bounded() {
        let limiter = RateLimiter::with_max_buckets(10, 100);
        let start = Instant::now();
        for i in 0..1000u32 {
            let now = start + Duration::from_millis(u64::from(i));
            let _ = limiter.check(IpAddr::from(i.to_be_bytes()), now);
            assert!(limiter.tracked() <= 100);
        }
        // Idle buckets go first: two minutes later everyone is full again.
        let small = RateLimiter::with_max_buckets(10, 10);
        for i in 0..10u32 {
            let _ = small.check(IpAddr::from(i.to_be_bytes()), start);
        }
        assert_eq!(small.tracked(), 10);
        let _ = small.check(ip("8.8.8.8"), start + Duration::from_secs(120));
        assert_eq!(small.tracked(), 1);
    }
}
