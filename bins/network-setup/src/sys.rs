//! network-setup's only `unsafe` code: handing the host connection to
//! vm-switch as descriptor 3.

use std::io;
use std::os::fd::RawFd;

/// The descriptor number vm-switch reads its host link from (`-vsock-fd`).
pub const CHILD_LINK_FD: RawFd = 3;

/// Makes `fd` (open in this process, close-on-exec) appear in the child
/// started by `cmd` as descriptor 3, without close-on-exec. `fd` must stay
/// open until the child has been spawned.
pub fn pass_as_fd3(cmd: &mut tokio::process::Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe functions may be called: it calls only dup2 and
    // fcntl (both async-signal-safe), allocates nothing and touches no memory
    // shared with other threads. `fd` is open in the child because the
    // parent keeps it open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == CHILD_LINK_FD {
                // Already number 3: only clear close-on-exec.
                libc::fcntl(CHILD_LINK_FD, libc::F_SETFD, 0)
            } else {
                // dup2 leaves close-on-exec clear on the new descriptor.
                libc::dup2(fd, CHILD_LINK_FD)
            };
            if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
        });
    }
}

/// Whether the peer of the connected socket `fd` has hung up, shut down its
/// sending side or reset the connection, without reading from it (a poll
/// with zero timeout; POLLRDHUP is what a vsock or TCP peer's close shows).
pub fn peer_hung_up(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: `p` is one valid, exclusively borrowed pollfd and the count is
    // 1; the descriptor is open for the call's duration (it is borrowed); a
    // zero timeout makes the call return at once.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0)
}
