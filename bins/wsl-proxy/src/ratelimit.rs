//! A bound on log lines that a client of the control socket can cause.
//!
//! How this works: within each [`WINDOW`] at most [`BURST`] lines pass; the
//! rest are counted, and the first line of a later window says how many
//! were left out. One limiter is shared by every control connection, so
//! neither one big message nor many small ones can flood the log. Time is
//! passed in, so tests drive it.

use std::time::{Duration, Instant};

pub use rdnet_wire::ratelimit::Verdict;

pub const WINDOW: Duration = Duration::from_secs(10);
pub const BURST: u32 = 30;

/// [`BURST`] lines per [`WINDOW`] (`rdnet_wire::ratelimit`, shared by
/// every program).
#[derive(Debug)]
pub struct LogLimiter(rdnet_wire::ratelimit::Window);

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter(rdnet_wire::ratelimit::Window::new(BURST, WINDOW))
    }
}

impl LogLimiter {
    pub fn check(&mut self, now: Instant) -> Verdict {
        self.0.check(now)
    }
}

/// `limited!(level, limiter, "fmt", args…)`: logs through a
/// `std::sync::Mutex<LogLimiter>`, adding how many lines were left out.
macro_rules! limited {
    ($level:ident, $limiter:expr, $($arg:tt)+) => {{
        let verdict = match $limiter.lock() {
            Ok(mut l) => l.check(std::time::Instant::now()),
            Err(poisoned) => poisoned.into_inner().check(std::time::Instant::now()),
        };
        if let $crate::ratelimit::Verdict::Log { suppressed } = verdict {
            if suppressed > 0 {
                tracing::$level!("{} ({suppressed} similar lines left out)", format_args!($($arg)+));
            } else {
                tracing::$level!($($arg)+);
            }
        }
    }};
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_quiet_then_reports() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.check(t0), Verdict::Log { suppressed: 0 });
        }
        assert_eq!(l.check(t0 + Duration::from_secs(1)), Verdict::Quiet);
        assert_eq!(l.check(t0 + WINDOW - Duration::from_millis(1)), Verdict::Quiet);
        assert_eq!(l.check(t0 + WINDOW), Verdict::Log { suppressed: 2 });
        assert_eq!(l.check(t0 + WINDOW), Verdict::Log { suppressed: 0 });
    }
}
