//! Keyed rate limits (GCRA, from governor) that answer with how long to wait.

use crate::config::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use std::num::NonZeroU32;
use std::time::Duration;

/// A limit was hit: the name of the limit and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub limit: &'static str,
    pub retry_after: Duration,
}

impl Limited {
    /// What was too much, in words, for people reading the error.
    pub fn what(&self) -> &'static str {
        match self.limit {
            "sms_per_number" => "too many codes were sent to this number",
            "sms_per_ip" => "too many codes were asked for from this address",
            "sms_per_prefix" => "too many codes were sent to numbers that start like this one",
            "checks_per_number" => "too many codes were tried for this number",
            "checks_per_ip" => "too many codes were tried from this address",
            "messages_per_device" => "too many messages were sent from this device",
            "group_changes_per_device" => "too many group changes were made from this device",
            "links_per_ip" => "too many link codes were asked for from here",
            "link_approvals_per_account" => "too many devices were linked to this account",
            "key_claims_per_device" => "too many encryption keys were fetched from this device",
            "key_uploads_per_device" => "too many encryption keys were uploaded from this device",
            "uploads_per_account" => "too many uploads were started from this account",
            "typing_per_device" => "too many typing updates were sent from this device",
            "push_registrations" => "this device changed its push registration too often",
            _ => "too many requests",
        }
    }
}

pub struct KeyedLimiter {
    name: &'static str,
    inner: governor::RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>,
    clock: DefaultClock,
}

impl std::fmt::Debug for KeyedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter").field("name", &self.name).finish_non_exhaustive()
    }
}

impl KeyedLimiter {
    pub fn new(name: &'static str, quota: Quota) -> Self {
        let period = Duration::from_millis(quota.per_ms.max(1));
        let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
        let quota = governor::Quota::with_period(period)
            .unwrap_or(governor::Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self { name, inner: governor::RateLimiter::keyed(quota), clock: DefaultClock::default() }
    }

    /// Takes one cell for `key`, or says how long until one is free.
    pub fn check(&self, key: &str) -> Result<(), Limited> {
        self.inner.check_key(&key.to_owned()).map_err(|not_until| {
            metrics::counter!("skylark_rate_limited_total", "limit" => self.name).increment(1);
            Limited { limit: self.name, retry_after: not_until.wait_time_from(self.clock.now()) }
        })
    }

    /// Takes `n` cells for `key` at once, or says how long until they are
    /// free; `Err(None)` when `n` is more than the burst ever holds.
    pub fn check_n(&self, key: &str, n: NonZeroU32) -> Result<(), Option<Limited>> {
        match self.inner.check_key_n(&key.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                metrics::counter!("skylark_rate_limited_total", "limit" => self.name).increment(1);
                Err(Some(Limited { limit: self.name, retry_after: not_until.wait_time_from(self.clock.now()) }))
            }
            Err(_) => Err(None),
        }
    }

    /// Drops state for keys whose cells are all replenished, so memory does
    /// not grow with every address ever seen.
    pub fn forget_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_retry_after() {
        let limiter = KeyedLimiter::new("test", Quota { burst: 2, per_ms: 60_000 });
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        let limited = limiter.check("a").unwrap_err();
        assert_eq!(limited.limit, "test");
        assert!(limited.retry_after > Duration::from_secs(50), "{:?}", limited.retry_after);
        assert!(limiter.check("b").is_ok(), "keys are independent");
    }
}
