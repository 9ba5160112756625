//! Rate limiting for logs a guest can trigger.
//!
//! How this works: each call site names a key; within a window of
//! [`WINDOW`] at most [`BURST`] messages per key pass, and the first message
//! of the next window reports how many were suppressed. Time comes from the
//! caller, so the limiter is deterministic under test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(10);
pub const BURST: u32 = 5;

#[derive(Debug, Default)]
pub struct LogLimiter {
    keys: HashMap<&'static str, Slot>,
}

#[derive(Debug)]
struct Slot {
    start: Instant,
    passed: u32,
    suppressed: u64,
}

/// Whether to log, and how many messages were dropped since the last one.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Log { suppressed: u64 },
    Quiet,
}

impl LogLimiter {
    pub fn check(&mut self, key: &'static str, now: Instant) -> Verdict {
        let slot = self.keys.entry(key).or_insert(Slot { start: now, passed: 0, suppressed: 0 });
        if now.saturating_duration_since(slot.start) >= WINDOW {
            slot.start = now;
            slot.passed = 0;
        }
        if slot.passed < BURST {
            slot.passed += 1;
            let suppressed = std::mem::take(&mut slot.suppressed);
            Verdict::Log { suppressed }
        } else {
            slot.suppressed += 1;
            Verdict::Quiet
        }
    }
}

/// `limited_warn!(limiter, now, "key", "fmt", args…)` logs at warn level
/// through a [`LogLimiter`].
#[macro_export]
macro_rules! limited_warn {
    ($limiter:expr, $now:expr, $key:literal, $($arg:tt)+) => {
        if let $crate::ratelimit::Verdict::Log { suppressed } = $limiter.check($key, $now) {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    };
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
}
