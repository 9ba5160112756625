//! Process hygiene at start-up (Unix): close file descriptors the program
//! inherited but does not own, so a daemon does not keep a parent's files,
//! sockets or pipes open (and alive) for its whole life.
#![allow(unsafe_code)]

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
