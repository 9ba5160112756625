//! Process hygiene at start-up (Unix): close file descriptors the program
//! inherited but does not own, so a daemon does not keep a parent's files,
//! sockets or pipes open (and alive) for its whole life. And the end of a
//! Windows console program: console control events (Ctrl-C, Ctrl-Break,
//! the console closing, logoff, system shutdown) feed the same shutdown as
//! SIGTERM on Unix.
//!
//! How the console events work: [`watch_console`] registers one handler
//! with `SetConsoleCtrlHandler`. Windows runs it on a new thread per event;
//! it passes the event to the program's callback and returns at once for
//! Ctrl-C and Ctrl-Break (the program then shuts down on its own). For the
//! other three, Windows ends the process as soon as the handler returns
//! (and anyway about 5 s after a console close), so the handler waits until
//! the program calls [`console_shutdown_done`], or [`CLOSE_GRACE`] passes:
//! the shutdown gets its chance and its time is bounded.
#![allow(unsafe_code)]

use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[cfg(unix)]
use std::os::fd::RawFd;
/// A descriptor number; nothing is closed where there are none.
#[cfg(not(unix))]
type RawFd = i32;

/// Closes every descriptor above 2 except those in `keep`. Call it first in
/// `main`, before anything else opens a descriptor.
#[cfg(unix)]
pub fn close_inherited_fds(keep: &[RawFd]) {
    // List first, close after: the directory's own descriptor is in the
    // list while it is read (closing it then fails harmlessly with EBADF).
    let Ok(dir) = std::fs::read_dir("/proc/self/fd").or_else(|_| std::fs::read_dir("/dev/fd")) else { return };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: called at the start of main, before the program created
        // any descriptor of its own (besides the finished directory read
        // above), so no live Rust object owns `fd`: closing it cannot
        // invalidate an OwnedFd/File. An already-closed fd gives EBADF,
        // which is ignored.
        unsafe {
            libc::close(fd);
        }
    }
}

#[cfg(not(unix))]
pub fn close_inherited_fds(_keep: &[RawFd]) {}

/// Descriptors a command line names as `fd://N` (endpoints the program was
/// handed by its parent): those are the program's own.
pub fn fds_named_in_args(args: impl IntoIterator<Item = String>) -> Vec<RawFd> {
    args.into_iter()
        .filter_map(|a| a.split("fd://").nth(1).and_then(|n| n.trim_end_matches('/').parse().ok()))
        .collect()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn named_fds_are_found() {
        let args = ["host-switch", "--listen", "fd://3", "--api=fd://7", "-debug"].map(String::from);
        assert_eq!(fds_named_in_args(args), vec![3, 7]);
    }

    #[test]
    fn inherited_fds_are_closed_and_kept_ones_stay() {
        // Runs in a child process so the test harness's own fds are safe.
        if std::env::var_os("RDNET_CLOSE_FDS_CHILD").is_some() {
            let keep = std::fs::File::open("/dev/null").unwrap();
            let drop_me = std::fs::File::open("/dev/null").unwrap();
            let (k, d) = (keep.as_raw_fd(), drop_me.as_raw_fd());
            std::mem::forget(drop_me);
            close_inherited_fds(&[k]);
            let open = |fd: RawFd| std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists();
            assert!(open(k) && !open(d));
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new(exe)
            .args(["--exact", "sys::tests::inherited_fds_are_closed_and_kept_ones_stay", "--test-threads=1"])
            .env("RDNET_CLOSE_FDS_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A console control event (Windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEvent {
    CtrlC,
    CtrlBreak,
    Close,
    Logoff,
    Shutdown,
}

impl ConsoleEvent {
    /// From a `CTRL_*_EVENT` code.
    pub fn from_code(code: u32) -> Option<ConsoleEvent> {
        Some(match code {
            0 => ConsoleEvent::CtrlC,
            1 => ConsoleEvent::CtrlBreak,
            2 => ConsoleEvent::Close,
            5 => ConsoleEvent::Logoff,
            6 => ConsoleEvent::Shutdown,
            _ => return None,
        })
    }

    /// Windows ends the process once the handler of this event returns.
    pub fn ends_process(self) -> bool {
        matches!(self, ConsoleEvent::Close | ConsoleEvent::Logoff | ConsoleEvent::Shutdown)
    }
}

impl std::fmt::Display for ConsoleEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsoleEvent::CtrlC => "Ctrl-C",
            ConsoleEvent::CtrlBreak => "Ctrl-Break",
            ConsoleEvent::Close => "console closed",
            ConsoleEvent::Logoff => "logoff",
            ConsoleEvent::Shutdown => "system shutdown",
        })
    }
}

/// The longest a handler of an event that ends the process waits for the
/// program's shutdown (Windows allows about 5 s after a console close).
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

type Watcher = Box<dyn Fn(ConsoleEvent) + Send>;
static WATCHER: Mutex<Option<Watcher>> = Mutex::new(None);
/// Set by [`console_shutdown_done`]; handlers waiting in [`after_event`] wake.
static DONE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Calls `on_event` for every console control event from now on (Windows;
/// elsewhere there are none and this does nothing).
pub fn watch_console(on_event: impl Fn(ConsoleEvent) + Send + 'static) -> std::io::Result<()> {
    *WATCHER.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(on_event));
    register_handler()
}

/// The program has shut down: a handler waiting for that may return now
/// (and Windows end the process).
pub fn console_shutdown_done() {
    let (done, cv) = &DONE;
    *done.lock().unwrap_or_else(|e| e.into_inner()) = true;
    cv.notify_all();
}

/// What the handler does with an event (also the tests' entry point):
/// tell the watcher, then for an event that ends the process wait for the
/// shutdown, at most `grace`. Whether the event was handled.
#[cfg_attr(not(windows), allow(dead_code))]
fn after_event(code: u32, grace: Duration) -> bool {
    let Some(event) = ConsoleEvent::from_code(code) else { return false };
    if let Some(watcher) = WATCHER.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        watcher(event);
    }
    if event.ends_process() {
        let (done, cv) = &DONE;
        let guard = done.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cv.wait_timeout_while(guard, grace, |done| !*done);
    }
    true
}

#[cfg(windows)]
fn register_handler() -> std::io::Result<()> {
    use windows_sys::Win32::System::Console::SetConsoleCtrlHandler;
    unsafe extern "system" fn handler(code: u32) -> windows_sys::core::BOOL {
        // No unwinding out of a system callback: `after_event` does not
        // panic (poisoned locks are taken over), but be sure.
        std::panic::catch_unwind(|| after_event(code, CLOSE_GRACE)).unwrap_or(false).into()
    }
    // SAFETY: registers a function with the signature the system expects;
    // it stays registered for the life of the process.
    if unsafe { SetConsoleCtrlHandler(Some(handler), 1) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(windows))]
fn register_handler() -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod console_tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// One test: the watcher and the done flag are process-wide.
    #[test]
    fn events_reach_the_watcher_and_closing_waits_for_the_shutdown_within_bounds() {
        assert_eq!(ConsoleEvent::from_code(0), Some(ConsoleEvent::CtrlC));
        assert_eq!(ConsoleEvent::from_code(1), Some(ConsoleEvent::CtrlBreak));
        assert_eq!(ConsoleEvent::from_code(2), Some(ConsoleEvent::Close));
        assert_eq!(ConsoleEvent::from_code(5), Some(ConsoleEvent::Logoff));
        assert_eq!(ConsoleEvent::from_code(6), Some(ConsoleEvent::Shutdown));
        assert_eq!(ConsoleEvent::from_code(3), None);
        assert!(!ConsoleEvent::CtrlC.ends_process() && ConsoleEvent::Close.ends_process());

        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        watch_console(move |e| s.lock().unwrap().push(e)).unwrap();
        // Ctrl-C and Ctrl-Break return at once; unknown codes are not ours.
        let t = Instant::now();
        assert!(after_event(0, Duration::from_secs(10)));
        assert!(after_event(1, Duration::from_secs(10)));
        assert!(!after_event(4, Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(2));
        // A close with no shutdown finishing: bounded by the grace.
        let t = Instant::now();
        assert!(after_event(2, Duration::from_millis(300)));
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(5));
        // A logoff while the program shuts down: returns when it is done.
        let returned = Arc::new(AtomicUsize::new(0));
        let r = returned.clone();
        let waiter = std::thread::spawn(move || {
            after_event(5, Duration::from_secs(30));
            r.store(1, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(returned.load(Ordering::SeqCst), 0, "returned before the shutdown was done");
        let t = Instant::now();
        console_shutdown_done();
        waiter.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(
            *seen.lock().unwrap(),
            [ConsoleEvent::CtrlC, ConsoleEvent::CtrlBreak, ConsoleEvent::Close, ConsoleEvent::Logoff]
        );
    }
}
