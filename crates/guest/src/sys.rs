//! The crate's only `unsafe` code: the `TUNSETIFF` ioctl that turns an open
//! `/dev/net/tun` descriptor into a tap device.

use std::ffi::c_short;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Attaches `file` (an open `/dev/net/tun`) to the tap named `name` with
/// `flags` (`IFF_TAP | IFF_NO_PI | …`); returns the name the kernel used.
/// `name` must be shorter than `IFNAMSIZ` and free of NUL bytes.
pub(crate) fn tun_set_iff(file: &File, name: &str, flags: c_short) -> io::Result<String> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
    }
    // SAFETY: `struct ifreq` is plain old data (arrays, integers, a raw
    // pointer in a union); all-zero bytes are a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // Writing a `Copy` union field is safe; the kernel reads `ifr_flags`.
    ifr.ifr_ifru.ifru_flags = flags;
    // SAFETY: `file` is an open descriptor for the lifetime of the call and
    // `ifr` is a properly initialised `struct ifreq` that outlives it; the
    // kernel writes at most `sizeof(struct ifreq)` bytes back into it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let out: Vec<u8> = ifr.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sets a tap's offload flags (`TUN_F_*`).
pub(crate) fn tun_set_offload(file: &File, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long),
    // not through a pointer; `file` is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers `file` with the current tokio runtime's reactor. Errors (never
/// panics) when called outside a runtime.
pub(crate) fn register_file(file: File) -> io::Result<tokio::io::unix::AsyncFd<File>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("not inside a tokio runtime"));
    }
    // SAFETY: a `File` owns its descriptor: it stays open and refers to the
    // same open file description until the `File` (moved into the
    // `AsyncFd`) is dropped, and `as_raw_fd` always returns that descriptor.
    unsafe { tokio::io::unix::AsyncFd::register(file) }.map_err(|e| e.into_parts().1)
}
