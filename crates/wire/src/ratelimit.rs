//! The one rate limit for log lines that a peer (a guest, a client of a
//! control socket) can cause, shared by every program.
//!
//! How this works: a [`Window`] lets at most `burst` lines pass per
//! `window`; the rest are counted, and the first line of a later window
//! learns how many were held back, so the log says so. [`Keyed`] keeps one
//! window per call site. Time is passed in, so the limiter is
//! deterministic under test and free of any clock of its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Whether to log, and how many lines were held back since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Log { suppressed: u64 },
    Quiet,
}

/// At most `burst` lines per `window`.
#[derive(Debug, Clone)]
pub struct Window {
    burst: u32,
    window: Duration,
    start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl Window {
    pub const fn new(burst: u32, window: Duration) -> Self {
        Window { burst, window, start: None, passed: 0, suppressed: 0 }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.start.is_none_or(|start| now.saturating_duration_since(start) >= self.window) {
            self.start = Some(now);
            self.passed = 0;
        }
        if self.passed < self.burst {
            self.passed += 1;
            Verdict::Log { suppressed: std::mem::take(&mut self.suppressed) }
        } else {
            self.suppressed += 1;
            Verdict::Quiet
        }
    }
}

/// One [`Window`] per key (a call site's name).
#[derive(Debug, Clone)]
pub struct Keyed {
    burst: u32,
    window: Duration,
    keys: HashMap<&'static str, Window>,
}

impl Keyed {
    pub fn new(burst: u32, window: Duration) -> Self {
        Keyed { burst, window, keys: HashMap::new() }
    }

    pub fn check(&mut self, key: &'static str, now: Instant) -> Verdict {
        let (burst, window) = (self.burst, self.window);
        self.keys.entry(key).or_insert_with(|| Window::new(burst, window)).check(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    #[test]
    fn a_window_bursts_then_counts_then_reports() {
        let mut l = Window::new(3, W);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check(t0), Verdict::Log { suppressed: 0 });
        }
        assert_eq!(l.check(t0 + Duration::from_secs(1)), Verdict::Quiet);
        assert_eq!(l.check(t0 + W - Duration::from_millis(1)), Verdict::Quiet);
        assert_eq!(l.check(t0 + W), Verdict::Log { suppressed: 2 });
        assert_eq!(l.check(t0 + W), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn keys_are_limited_apart() {
        let mut l = Keyed::new(1, W);
        let t0 = Instant::now();
        assert_eq!(l.check("a", t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check("a", t0), Verdict::Quiet);
        assert_eq!(l.check("b", t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check("a", t0 + W), Verdict::Log { suppressed: 1 });
    }
}
