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
