//! Rate limiting for logs a guest can trigger.
//!
//! How this works: each call site names a key; within a window of
//! [`WINDOW`] at most [`BURST`] messages per key pass, and the first message
//! of the next window reports how many were suppressed
//! (`rdnet_wire::ratelimit`, which every program shares). Time comes from
//! the caller, so the limiter is deterministic under test.

use std::time::{Duration, Instant};

pub use rdnet_wire::ratelimit::Verdict;

pub const WINDOW: Duration = Duration::from_secs(10);
pub const BURST: u32 = 5;

/// [`BURST`] lines per [`WINDOW`] for each call site.
#[derive(Debug)]
pub struct LogLimiter(rdnet_wire::ratelimit::Keyed);

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter(rdnet_wire::ratelimit::Keyed::new(BURST, WINDOW))
    }
}

impl LogLimiter {
    pub fn check(&mut self, key: &'static str, now: Instant) -> Verdict {
        self.0.check(key, now)
    }
}

/// `limited!(level, limiter, now, "key", "fmt", args…)` logs at `level`
/// (`warn`, `info`, `debug`) through a [`LogLimiter`], with the count of
/// lines held back since the last one that passed.
#[macro_export]
macro_rules! limited {
    ($level:ident, $limiter:expr, $now:expr, $key:literal, $($arg:tt)+) => {
        if let $crate::ratelimit::Verdict::Log { suppressed } = $limiter.check($key, $now) {
            if suppressed > 0 {
                tracing::$level!(suppressed, $($arg)+);
            } else {
                tracing::$level!($($arg)+);
            }
        }
    };
}

/// `limited_warn!(limiter, now, "key", "fmt", args…)`: [`limited!`] at warn.
#[macro_export]
macro_rules! limited_warn {
    ($limiter:expr, $now:expr, $key:literal, $($arg:tt)+) => {
        $crate::limited!(warn, $limiter, $now, $key, $($arg)+)
    };
}

/// At most one probe a second per address (ARP, neighbour solicitation),
/// remembered for at most `MAX` addresses at once: beyond them, no probe
/// until some are a second old.
#[derive(Debug)]
pub struct ProbeLimit<K, const MAX: usize> {
    last: crate::FastMap<K, Instant>,
}

impl<K, const MAX: usize> Default for ProbeLimit<K, MAX> {
    fn default() -> Self {
        ProbeLimit { last: crate::FastMap::default() }
    }
}

impl<K: std::hash::Hash + Eq, const MAX: usize> ProbeLimit<K, MAX> {
    const EVERY: Duration = Duration::from_secs(1);

    /// Whether `key` may be probed now (if so, counted as probed).
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if self.last.get(&key).is_some_and(|last| now.saturating_duration_since(*last) < Self::EVERY) {
            return false;
        }
        if self.last.len() >= MAX {
            self.last.retain(|_, t| now.saturating_duration_since(*t) < Self::EVERY);
            if self.last.len() >= MAX {
                return false;
            }
        }
        self.last.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_quiet_then_reports() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.check("k", t0), Verdict::Log { suppressed: 0 });
        }
        assert_eq!(l.check("k", t0), Verdict::Quiet);
        assert_eq!(l.check("k", t0), Verdict::Quiet);
        assert_eq!(l.check("other", t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check("k", t0 + WINDOW), Verdict::Log { suppressed: 2 });
    }

    #[test]
    fn probes_once_a_second_per_key_for_a_bounded_number_of_keys() {
        let mut p = ProbeLimit::<u32, 2>::default();
        let t0 = Instant::now();
        assert!(p.allow(1, t0));
        assert!(!p.allow(1, t0 + Duration::from_millis(999)));
        assert!(p.allow(1, t0 + Duration::from_secs(1)));
        assert!(p.allow(2, t0 + Duration::from_secs(1)));
        // Full of keys probed within the second: none more until they age.
        assert!(!p.allow(3, t0 + Duration::from_millis(1500)));
        assert!(p.allow(3, t0 + Duration::from_secs(2)));
    }
}
