//! Per-subsystem publish rate limits (messages/s and bytes/s), enforced by each node on the
//! requests it receives, like Kafka's per-broker client quotas.
//!
//! A token bucket per subsystem holds up to one second of its rate. A request is admitted
//! while the bucket is not in debt and takes what it needs, possibly going into debt, so a
//! batch larger than one second's worth still passes and the average stays at the rate.
//! A request arriving while the bucket is in debt is refused with the time until the debt is
//! paid off, which the client gets as a retry hint.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kerwen_broker::access::SubsystemQuota;
use kerwen_broker::ids::SubsystemId;

/// Buckets of subsystems idle for this long are dropped (they refill to full anyway).
const IDLE_AFTER: Duration = Duration::from_secs(60);
/// Shortest retry hint, so clients do not spin.
const MIN_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens available; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
    }
}

#[derive(Debug, Default)]
struct Buckets {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

/// The rate limits of one node.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<SubsystemId, Buckets>>,
}

/// A refused request: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    pub retry_after: Duration,
    pub limit: &'static str,
}

impl RateLimiter {
    /// Admits a publish of `messages` messages and `bytes` payload bytes by `who`, or says
    /// how long to wait.
    pub fn admit(&self, who: &SubsystemId, quota: &SubsystemQuota, messages: u64, bytes: u64) -> Result<(), Throttled> {
        self.admit_at(who, quota, messages, bytes, Instant::now())
    }

    fn admit_at(&self, who: &SubsystemId, quota: &SubsystemQuota, messages: u64, bytes: u64, now: Instant) -> Result<(), Throttled> {
        if quota.publish_messages_per_second.is_none() && quota.publish_bytes_per_second.is_none() {
            return Ok(());
        }
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() > 1024 {
            all.retain(|_, b| [b.messages, b.bytes].iter().flatten().any(|b| now.saturating_duration_since(b.last) < IDLE_AFTER));
        }
        let buckets = all.entry(who.clone()).or_default();
        let mut limits = [
            (quota.publish_messages_per_second, &mut buckets.messages, messages, "messages per second"),
            (quota.publish_bytes_per_second, &mut buckets.bytes, bytes, "bytes per second"),
        ];
        // Check both before taking from either: a refused request costs nothing.
        let mut wait: Option<Throttled> = None;
        for (rate, bucket, _, name) in &mut limits {
            let Some(rate) = rate.filter(|r| *r > 0).map(|r| r as f64) else { continue };
            let b = bucket.get_or_insert(Bucket { tokens: rate, last: now });
            b.refill(rate, now);
            if b.tokens < 0.0 {
                let after = Duration::from_secs_f64(-b.tokens / rate).max(MIN_RETRY);
                if wait.is_none_or(|w| after > w.retry_after) {
                    wait = Some(Throttled { retry_after: after, limit: *name });
                }
            }
        }
        if let Some(w) = wait {
            return Err(w);
        }
        for (rate, bucket, amount, _) in limits {
            if let (true, Some(b)) = (rate.is_some_and(|r| r > 0), bucket.as_mut()) {
                b.tokens -= amount as f64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_to_the_rate_with_a_retry_hint() {
        let limiter = RateLimiter::default();
        let who: SubsystemId = "TM/GOV/MINCOM/registry".parse().unwrap();
        let other: SubsystemId = "TM/GOV/MINFIN/tax".parse().unwrap();
        let quota = SubsystemQuota { publish_messages_per_second: Some(100), ..Default::default() };
        let t0 = Instant::now();
        // One second's worth passes at once, and one batch beyond it goes into debt.
        assert!(limiter.admit_at(&who, &quota, 60, 0, t0).is_ok());
        assert!(limiter.admit_at(&who, &quota, 60, 0, t0).is_ok());
        let refused = limiter.admit_at(&who, &quota, 1, 0, t0).unwrap_err();
        assert!((refused.retry_after.as_millis() as i64 - 200).abs() <= 1, "{refused:?}");
        // Another subsystem is not affected.
        assert!(limiter.admit_at(&other, &quota, 100, 0, t0).is_ok());
        // After the debt is paid, it passes again.
        assert!(limiter.admit_at(&who, &quota, 1, 0, t0 + Duration::from_millis(201)).is_ok());
        // Unlimited subsystems never wait.
        assert!(limiter.admit_at(&who, &SubsystemQuota::default(), 1_000_000, 1 << 40, t0).is_ok());
    }

    #[test]
    fn the_tighter_of_two_limits_decides() {
        let limiter = RateLimiter::default();
        let who: SubsystemId = "TM/GOV/MINCOM/registry".parse().unwrap();
        let quota = SubsystemQuota { publish_messages_per_second: Some(1000), publish_bytes_per_second: Some(1000), ..Default::default() };
        let t0 = Instant::now();
        assert!(limiter.admit_at(&who, &quota, 1, 3000, t0).is_ok());
        let refused = limiter.admit_at(&who, &quota, 1, 1, t0).unwrap_err();
        assert_eq!(refused.limit, "bytes per second");
        assert!(refused.retry_after >= Duration::from_millis(1990), "{refused:?}");
    }
}
