//! Who is asking: the client address behind trusted proxies, and the per-client
//! token bucket of `/confirm` (`CONFIRM_RATE_LIMIT_PER_MINUTE`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{PoisonError, RwLock};

use axum::http::HeaderMap;
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
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

type Keyed<C> = governor::RateLimiter<
    IpAddr,
    DashMapStateStore<IpAddr>,
    C,
    NoOpMiddleware<<C as Clock>::Instant>,
>;

/// A token bucket per client, keyed and sharded (`governor`'s GCRA over a
/// `DashMap`: requests of clients on different shards never wait on one
/// lock): `per_minute` requests, refilled evenly over a minute.
pub struct RateLimiter<C: Clock = DefaultClock> {
    /// Read-locked by every check (readers never wait on each other); written
    /// only to start afresh when the limiter is full of active clients.
    limiter: RwLock<Keyed<C>>,
    quota: Quota,
    clock: C,
    max_buckets: usize,
}

impl<C: Clock> std::fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("max_buckets", &self.max_buckets)
            .finish_non_exhaustive()
    }
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
        Self::with_clock(per_minute, MAX_BUCKETS, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    /// Like [`RateLimiter::new`], with a chosen bound on tracked clients and
    /// clock (tests advance a fake one).
    pub fn with_clock(per_minute: u32, max_buckets: usize, clock: C) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(per_minute);
        Self {
            limiter: RwLock::new(governor::RateLimiter::dashmap_with_clock(
                quota,
                clock.clone(),
            )),
            quota,
            clock,
            max_buckets: max_buckets.max(1),
        }
    }

    /// Takes a token for `ip`.
    pub fn check(&self, ip: IpAddr) -> Decision {
        let key = bucket_key(ip);
        if self.tracked() >= self.max_buckets {
            self.evict();
        }
        let limiter = self.limiter.read().unwrap_or_else(PoisonError::into_inner);
        match limiter.check_key(&key) {
            Ok(()) => Decision::Allow,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                // At most a minute (one token at per_minute per minute).
                let secs = wait.as_secs_f64().ceil().clamp(1.0, 3600.0) as u64;
                Decision::Limit { retry_after: secs }
            }
        }
    }

    /// Forgets clients whose bucket has refilled (a fresh bucket would be the
    /// same). If every client is still active, all are forgotten: memory
    /// stays bounded, at the price of forgiving them.
    fn evict(&self) {
        let mut limiter = self.limiter.write().unwrap_or_else(PoisonError::into_inner);
        limiter.retain_recent();
        limiter.shrink_to_fit();
        let tracked = limiter.len();
        if tracked >= self.max_buckets {
            *limiter = governor::RateLimiter::dashmap_with_clock(self.quota, self.clock.clone());
            tracing::warn!(
                tracked,
                "rate limiter full of active clients: started afresh"
            );
        }
    }

    /// How many clients are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

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
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(3, MAX_BUCKETS, clock.clone());
        let a = ip("1.2.3.4");
        for _ in 0..3 {
            assert_eq!(limiter.check(a), Decision::Allow);
        }
        // 3 per minute: one token every 20 s.
        assert_eq!(limiter.check(a), Decision::Limit { retry_after: 20 });
        clock.advance(Duration::from_secs(15));
        assert_eq!(limiter.check(a), Decision::Limit { retry_after: 5 });
        clock.advance(Duration::from_secs(5));
        assert_eq!(limiter.check(a), Decision::Allow);
        // Another client is not affected.
        assert_eq!(limiter.check(ip("1.2.3.5")), Decision::Allow);
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let limiter = RateLimiter::new(1);
        assert_eq!(limiter.check(ip("2001:db8::1")), Decision::Allow);
        assert!(matches!(
            limiter.check(ip("2001:db8::2")),
            Decision::Limit { .. }
        ));
        assert_eq!(limiter.check(ip("2001:db8:0:1::1")), Decision::Allow);
    }

    #[test]
    fn memory_stays_bounded() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(10, 100, clock.clone());
        for i in 0..1000u32 {
            clock.advance(Duration::from_millis(1));
            let _ = limiter.check(IpAddr::from(i.to_be_bytes()));
            assert!(limiter.tracked() <= 100);
        }
        // Idle buckets go first: two minutes later everyone is full again.
        let small = RateLimiter::with_clock(10, 10, clock.clone());
        for i in 0..10u32 {
            let _ = small.check(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(small.tracked(), 10);
        clock.advance(Duration::from_secs(120));
        let _ = small.check(ip("8.8.8.8"));
        assert_eq!(small.tracked(), 1);
    }
}
