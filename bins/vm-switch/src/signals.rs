//! What each signal does to vm-switch.
//!
//! How this works: SIGTERM, SIGINT and SIGHUP end the program cleanly;
//! SIGUSR1 toggles packet tracing (Rancher Desktop documents
//! `kill -USR1 $(pgrep vm-switch)` as its debugging step, which would
//! otherwise kill the switch and take the distro offline). Every other
//! signal whose default action ends a process and that is sent rather than
//! caused by a fault (SIGUSR2, SIGALRM, SIGQUIT, the real-time signals…)
//! gets a handler that only logs it. Handlers, unlike ignored dispositions,
//! are reset in the programs vm-switch starts (the `-dhcp-script`), so
//! those keep the defaults. SIGPIPE is left to Rust's runtime, which
//! ignores it (and restores it in children): a write to a closed pipe is
//! an error, and logging it from a handler could itself raise one.

use std::future::pending;
use std::io;

use nix::sys::signal::Signal as NixSignal;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{debug, info};

/// What a caught signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// End the program (status 0); the signal's name.
    Exit(&'static str),
    ToggleTrace,
}

pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

/// Signals that end a process by default but mean nothing to vm-switch.
fn harmless() -> Vec<i32> {
    let mut v = vec![
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGQUIT,
    ];
    v.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    v
}

/// `SIGUSR2`, `SIGRTMIN+3`.
fn name(n: i32) -> String {
    match NixSignal::try_from(n) {
        Ok(s) => s.as_str().to_string(),
        Err(_) => format!("SIGRTMIN+{}", n - libc::SIGRTMIN()),
    }
}

/// Waits for the next delivery; never returns if the driver is gone.
async fn next(s: &mut Signal) {
    if s.recv().await.is_none() {
        pending::<()>().await;
    }
}

impl Signals {
    /// Installs every handler; call it inside the runtime.
    pub fn install() -> io::Result<Signals> {
        let signals = Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        };
        for n in harmless() {
            match signal(SignalKind::from_raw(n)) {
                Ok(mut s) => {
                    tokio::spawn(async move {
                        while s.recv().await.is_some() {
                            info!("{} ignored", name(n));
                        }
                    });
                }
                // Some real-time signals may be reserved; they stay as they are.
                Err(e) => debug!("cannot catch {}: {e}", name(n)),
            }
        }
        Ok(signals)
    }

    /// The next signal that asks for something.
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = next(&mut self.term) => Event::Exit("SIGTERM"),
            _ = next(&mut self.int) => Event::Exit("SIGINT"),
            _ = next(&mut self.hup) => Event::Exit("SIGHUP"),
            _ = next(&mut self.usr1) => Event::ToggleTrace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(libc::SIGUSR2), "SIGUSR2");
        assert_eq!(name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
    }

    #[test]
    fn the_ones_that_end_it_are_not_ignored() {
        let h = harmless();
        for n in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1, libc::SIGPIPE, libc::SIGKILL] {
            assert!(!h.contains(&n), "{}", name(n));
        }
        assert!(h.contains(&libc::SIGUSR2) && h.contains(&libc::SIGALRM) && h.contains(&libc::SIGRTMAX()));
    }

    #[test]
    fn a_caught_signal_is_reported_and_a_harmless_one_is_survived() {
        // Runs in a child process: a signal to the test harness itself
        // would reach every test thread.
        if std::env::var_os("VMSW_SIGNALS_CHILD").is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args(["--exact", "signals::tests::a_caught_signal_is_reported_and_a_harmless_one_is_survived"])
                .env("VMSW_SIGNALS_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut s = Signals::install().unwrap();
            let me = nix::unistd::Pid::this();
            for sig in [NixSignal::SIGUSR2, NixSignal::SIGALRM, NixSignal::SIGQUIT, NixSignal::SIGPIPE] {
                nix::sys::signal::kill(me, sig).unwrap();
            }
            nix::sys::signal::kill(me, NixSignal::SIGUSR1).unwrap();
            assert_eq!(s.next().await, Event::ToggleTrace);
            nix::sys::signal::kill(me, NixSignal::SIGHUP).unwrap();
            assert_eq!(s.next().await, Event::Exit("SIGHUP"));
        });
    }
}
