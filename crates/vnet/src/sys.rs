//! Platform code of the virtual network: memory for TCP socket buffers that
//! costs only what is used, the process's own memory figures, and (on
//! Windows) ICMP echo through the system's ICMP API.
//! The only module of this crate allowed `unsafe`.
//!
//! How the buffer memory works. A flow's smoltcp buffers are large (so one
//! fast flow can fill a long fat pipe) but most flows move little. Each
//! flow's buffers live in one [`LazyRegion`]: address space reserved up
//! front, memory committed in [`CHUNK`]s as data reaches it, and handed back
//! (decommitted) when the flow idles. Whoever is about to write into the
//! region first calls [`LazyRegion::commit`] for the bytes it will write
//! (`flow_memory` works out which bytes smoltcp and a host read will touch);
//! a refusal there is an ordinary error the flow turns into a RST, so the
//! process never dies of a failed allocation. A bitmap of committed chunks
//! keeps commits of memory that is already there free of system calls.
//!
//! - Windows: `VirtualAlloc(MEM_RESERVE)`, then `MEM_COMMIT` per run of
//!   chunks (this is where commit charge is taken, and where it can be
//!   refused), `MEM_DECOMMIT` on release. Reserved but uncommitted pages
//!   fault when touched; a vectored exception handler commits a chunk that
//!   a live region's user touched without committing it first (which a
//!   correct caller never does: [`fault_commits`] counts them, and tests
//!   check it stays 0), so the slices of a live region stay usable memory
//!   just as on Linux.
//! - Linux release builds: a private anonymous `MAP_NORESERVE` mapping,
//!   read-write from the start; the kernel commits a page when it is first
//!   written, so `commit` only keeps the bitmap; release is
//!   `madvise(MADV_DONTNEED)`.
//! - Linux debug builds (every test): the Windows discipline exactly, with
//!   `PROT_NONE` for reserved and `mprotect` for committed, and no handler:
//!   a write the caller did not commit first is a SIGSEGV, so the unit and
//!   end-to-end tests prove the commit predictions that Windows relies on.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Commit granularity: small enough that a flow moving a few bytes costs
/// 16 KiB per direction, large enough that a bulk flow commits its 2 MiB in
/// a few calls.
pub const CHUNK: usize = 16 * 1024;

/// Bytes committed in all live regions (the `/stats` figure).
static COMMITTED: AtomicUsize = AtomicUsize::new(0);
/// Chunks the fault handler had to commit (should stay 0).
static FAULT_COMMITS: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
thread_local! {
    /// [`FAULT_COMMITS`] of this thread alone (tests run side by side).
    static THREAD_FAULT_COMMITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Fault commits on the calling thread (tests).
#[cfg(test)]
pub fn fault_commits_on_this_thread() -> u64 {
    THREAD_FAULT_COMMITS.with(|c| c.get())
}

/// Bytes of buffer memory committed in all live regions.
pub fn committed_total() -> usize {
    COMMITTED.load(Ordering::Relaxed)
}

/// Chunks committed by the Windows fault handler because a write reached
/// them uncommitted (a wrong prediction in `flow_memory`); 0 elsewhere.
pub fn fault_commits() -> u64 {
    FAULT_COMMITS.load(Ordering::Relaxed)
}

/// The system refused to commit memory for a region.
#[derive(Debug, thiserror::Error)]
#[error("cannot commit {len} bytes of buffer memory: {source}")]
pub struct CommitError {
    pub len: usize,
    #[source]
    pub source: std::io::Error,
}

/// A reserved, lazily committed memory region, split into two `'static`
/// slices for a flow's receive and transmit buffers.
///
/// The slices claim `'static` because smoltcp's `SocketSet<'static>` needs
/// it, though they are only valid while the region lives: that is why
/// [`LazyRegion::split`] is `unsafe`, and its caller's contract is written
/// there. A byte may be written only after [`LazyRegion::commit`] covered
/// it since the last [`LazyRegion::release`] (a release makes the region
/// read as zeros again and gives its memory back).
pub struct LazyRegion {
    ptr: NonNull<u8>,
    /// What the caller asked for.
    len: usize,
    /// The mapping: `len` rounded up to whole chunks.
    mapped: usize,
    handed_out: bool,
    /// One bit per chunk: committed since the last release.
    bits: Box<[u64]>,
    committed_chunks: usize,
    /// One bit per chunk: written since the last release or recycle, as the
    /// writers report it ([`LazyRegion::wrote`]). A recycled region's pages
    /// stay (Linux release builds) and only these chunks are zeroed: a
    /// short connection commits a read-ahead it never fills.
    written: Box<[u64]>,
}

impl LazyRegion {
    /// Reserves `len` bytes of address space (nothing committed); `None` if
    /// the system refuses.
    pub fn new(len: usize) -> Option<Self> {
        if len == 0 {
            return None;
        }
        let mapped = len.checked_next_multiple_of(CHUNK)?;
        let ptr = os::reserve(mapped)?;
        let words = (mapped / CHUNK).div_ceil(64);
        Some(LazyRegion {
            ptr,
            len,
            mapped,
            handed_out: false,
            bits: vec![0; words].into(),
            committed_chunks: 0,
            written: vec![0; words].into(),
        })
    }

    /// Splits the region at `at` into two disjoint slices. Only once: a
    /// second call returns `None`, so no two live `&mut` can alias.
    ///
    /// # Safety
    ///
    /// The `'static` is a lie the caller must make true: the slices, and
    /// everything they are handed to, must be dropped or never used again
    /// before this region is dropped (the memory is unmapped then). The
    /// TCP NAT keeps both in one `FlowState`, whose `Drop` empties the
    /// socket set before its fields (the region among them) drop.
    /// Writing a byte that [`LazyRegion::commit`] did not cover is not
    /// undefined behaviour but a fault (Linux debug builds) or a counted
    /// repair ([`fault_commits`], Windows).
    pub unsafe fn split(&mut self, at: usize) -> Option<(&'static mut [u8], &'static mut [u8])> {
        if self.handed_out || at > self.len {
            return None;
        }
        self.handed_out = true;
        // SAFETY: the region is `len` bytes of address space owned by `self`
        // (reserved, and readable as zeros once committed); the two slices
        // are disjoint and handed out once. That they do not outlive `self`
        // is the caller's part (see # Safety).
        unsafe {
            let a = std::slice::from_raw_parts_mut(self.ptr.as_ptr(), at);
            let b = std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), self.len - at);
            Some((a, b))
        }
    }

    /// The region's size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: `new` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where `p` lies in the region, if it does (address arithmetic only:
    /// the write paths find their slice's place this way).
    pub fn offset_of(&self, p: *const u8) -> Option<usize> {
        (p as usize).checked_sub(self.ptr.as_ptr() as usize).filter(|off| *off <= self.len)
    }

    /// Makes `len` bytes from `offset` writable (the chunks around them).
    /// Already committed chunks cost nothing; the rest are committed in one
    /// call. Out-of-range parts are ignored.
    pub fn commit(&mut self, offset: usize, len: usize) -> Result<(), CommitError> {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return Ok(());
        }
        let (first, last) = (offset / CHUNK, (end - 1) / CHUNK);
        // The first and last chunk not yet committed in that span.
        let Some(lo) = (first..=last).find(|c| !self.is_committed(*c)) else { return Ok(()) };
        let hi = (lo..=last).rev().find(|c| !self.is_committed(*c)).unwrap_or(lo);
        let bytes = (hi - lo + 1) * CHUNK;
        // SAFETY: chunks lo..=hi lie inside the mapping made by `reserve`
        // (`hi` < mapped / CHUNK).
        let ok = unsafe { os::commit(self.ptr.as_ptr().add(lo * CHUNK), bytes) };
        if !ok {
            return Err(CommitError { len: bytes, source: std::io::Error::last_os_error() });
        }
        for c in lo..=hi {
            if !self.is_committed(c) {
                self.bits[c / 64] |= 1 << (c % 64);
                self.committed_chunks += 1;
                COMMITTED.fetch_add(CHUNK, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Bytes committed now, as this region counts them.
    pub fn committed(&self) -> usize {
        self.committed_chunks * CHUNK
    }

    /// Whether the byte at `offset` is committed.
    pub fn is_committed_at(&self, offset: usize) -> bool {
        offset < self.len && self.is_committed(offset / CHUNK)
    }

    fn is_committed(&self, chunk: usize) -> bool {
        self.bits[chunk / 64] & (1 << (chunk % 64)) != 0
    }

    fn is_written(&self, chunk: usize) -> bool {
        self.written[chunk / 64] & (1 << (chunk % 64)) != 0
    }

    /// `len` bytes from `offset` were written (or may have been): the
    /// chunks around them are zeroed when the region is recycled.
    pub fn wrote(&mut self, offset: usize, len: usize) {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return;
        }
        for c in offset / CHUNK..=(end - 1) / CHUNK {
            self.written[c / 64] |= 1 << (c % 64);
        }
    }

    /// Committed chunks holding something other than zeros that no
    /// writer reported (tests: a recycle would leave their bytes).
    #[cfg(test)]
    pub fn unreported_writes(&self) -> Vec<usize> {
        (0..self.mapped / CHUNK)
            .filter(|c| self.is_committed(*c) && !self.is_written(*c))
            .filter(|c| {
                // SAFETY: chunk `c` lies inside the mapping and is committed,
                // so readable; a test calls this while nothing writes the
                // region, and reads through the pointer (no reference that
                // would alias the slices handed out).
                (0..CHUNK).any(|i| unsafe { self.ptr.as_ptr().add(c * CHUNK + i).read() } != 0)
            })
            .collect()
    }

    /// Zeroes every committed chunk reported written, and forgets the
    /// reports.
    fn zero_written(&mut self) {
        for c in 0..self.mapped / CHUNK {
            if self.is_written(c) && self.is_committed(c) {
                // SAFETY: chunk `c` lies inside the mapping and is writable
                // (committed), and nothing reads the region meanwhile (the
                // callers' contracts).
                unsafe { self.ptr.as_ptr().add(c * CHUNK).write_bytes(0, CHUNK) };
            }
        }
        self.written.fill(0);
    }

    /// Gives the region's memory back to the system: it reads as zeros
    /// again and must be committed anew before it is written. Only for a
    /// region whose contents nobody will read: a flow calls it while both
    /// of its socket buffers are empty.
    pub fn release(&mut self) {
        // SAFETY: `ptr`/`mapped` are exactly the reservation; dropping the
        // pages only makes later reads see zeros (and writes fault until
        // committed), which the contract above makes harmless.
        unsafe { os::decommit(self.ptr.as_ptr(), self.mapped) };
        COMMITTED.fetch_sub(self.committed(), Ordering::Relaxed);
        self.bits.fill(0);
        self.committed_chunks = 0;
        self.written.fill(0);
    }
}

impl LazyRegion {
    /// Makes the region as good as new for a next user, without giving its
    /// address space back (the TCP NAT keeps a few for its next flows, see
    /// `RegionPool`): nothing committed by its count, ready to be split
    /// again, reading as zeros. Where committing costs nothing (Linux
    /// release builds) the pages themselves stay, zeroed, so the next user
    /// writes them without a page fault; elsewhere they are decommitted, as
    /// [`LazyRegion::release`] does.
    ///
    /// # Safety
    ///
    /// The slices [`LazyRegion::split`] handed out, and everything they were
    /// handed to, are dropped or never used again.
    pub unsafe fn recycle(&mut self) {
        if os::KEEPS_PAGES {
            // Zeros, as a new region reads: smoltcp reads only what it
            // wrote, but should a bug of its (or ours) ever read further,
            // it must not find another connection's bytes there. Only
            // chunks written can hold any; the rest were never touched.
            self.zero_written();
        }
        // SAFETY: `ptr`/`mapped` are exactly the reservation, and nobody
        // reads the old contents (the caller's contract).
        unsafe { os::forget(self.ptr.as_ptr(), self.mapped) };
        COMMITTED.fetch_sub(self.committed(), Ordering::Relaxed);
        self.bits.fill(0);
        self.committed_chunks = 0;
        self.written.fill(0);
        self.handed_out = false;
    }
}

impl Drop for LazyRegion {
    fn drop(&mut self) {
        COMMITTED.fetch_sub(self.committed(), Ordering::Relaxed);
        // SAFETY: `ptr`/`mapped` are exactly what `reserve` returned; the
        // slices into it are gone by the type's contract.
        unsafe { os::free(self.ptr.as_ptr(), self.mapped) };
    }
}

/// The process's own memory figures, for `/stats` and the logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProcessMemory {
    /// Private memory: Windows' commit charge (`PagefileUsage`), on Linux
    /// the resident anonymous memory (`RssAnon`).
    pub private_bytes: u64,
    /// Resident memory (working set / `VmRSS`).
    pub resident_bytes: u64,
}

/// This process's memory figures, where the system tells them.
pub fn process_memory() -> Option<ProcessMemory> {
    os::process_memory()
}

/// What the system's ICMP API got back for one echo request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EchoOutcome {
    /// An echo reply from `from`, carrying `data`.
    Reply { from: std::net::Ipv4Addr, data: Vec<u8> },
    /// No reply: the IP status code (`IP_REQ_TIMED_OUT`, unreachable, ...).
    NoReply(u32),
}

/// Sends one ICMP echo request to `dst` carrying `data` through
/// `IcmpSendEcho2` (iphlpapi: no administrator rights needed) and waits up
/// to `timeout` for the reply. Blocking: run it on a worker thread.
#[cfg(windows)]
pub fn icmp_echo(dst: std::net::Ipv4Addr, data: &[u8], timeout: std::time::Duration) -> std::io::Result<EchoOutcome> {
    use windows_sys::Win32::Foundation::{GetLastError, INVALID_HANDLE_VALUE};
    use windows_sys::Win32::NetworkManagement::IpHelper::{
        ICMP_ECHO_REPLY, IP_SUCCESS, IcmpCloseHandle, IcmpCreateFile, IcmpSendEcho2,
    };
    let size = u16::try_from(data.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "echo payload above 65535 bytes"))?;
    // The reply, its data, room for an ICMP error (8 bytes) and an
    // IO_STATUS_BLOCK, as the API asks; u64s for the reply's alignment.
    let reply_len = std::mem::size_of::<ICMP_ECHO_REPLY>() + data.len() + 8 + 16 + 64;
    let mut buf = vec![0u64; reply_len.div_ceil(8)];
    let buf_bytes = buf.len() * 8;
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: no preconditions; the handle is checked and closed below.
    let handle = unsafe { IcmpCreateFile() };
    if handle == INVALID_HANDLE_VALUE || handle.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a synchronous call (no event, no APC): `data` and `buf` are
    // valid for the sizes given for the whole call; the address is in
    // network byte order as IPAddr wants.
    let (n, err) = unsafe {
        let n = IcmpSendEcho2(
            handle,
            std::ptr::null_mut(),
            None,
            std::ptr::null(),
            u32::from_ne_bytes(dst.octets()),
            data.as_ptr().cast(),
            size,
            std::ptr::null(),
            buf.as_mut_ptr().cast(),
            buf_bytes as u32,
            timeout_ms,
        );
        let err = GetLastError();
        IcmpCloseHandle(handle);
        (n, err)
    };
    if n == 0 {
        // IP_STATUS codes (11000–11050) are answers; anything else is the
        // API failing.
        return if (11000..=11050).contains(&err) {
            Ok(EchoOutcome::NoReply(err))
        } else {
            Err(std::io::Error::from_raw_os_error(err as i32))
        };
    }
    // SAFETY: with n > 0 the buffer starts with an ICMP_ECHO_REPLY; `buf`
    // is 8-byte aligned and large enough.
    let reply = unsafe { std::ptr::read(buf.as_ptr().cast::<ICMP_ECHO_REPLY>()) };
    if reply.Status != IP_SUCCESS {
        return Ok(EchoOutcome::NoReply(reply.Status));
    }
    // The data pointer points into our buffer: check that it does before
    // reading through it.
    let base = buf.as_ptr() as usize;
    let start = (reply.Data as usize).checked_sub(base);
    let len = usize::from(reply.DataSize);
    let data = match start {
        Some(off) if off.checked_add(len).is_some_and(|end| end <= buf_bytes) => {
            // SAFETY: `off..off+len` lies inside `buf` (checked above).
            unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>().add(off), len) }.to_vec()
        }
        _ if len == 0 => Vec::new(),
        _ => return Err(std::io::Error::other("echo reply data outside the reply buffer")),
    };
    Ok(EchoOutcome::Reply { from: std::net::Ipv4Addr::from(reply.Address.to_ne_bytes()), data })
}

#[cfg(unix)]
mod os {
    use super::*;

    /// Debug builds emulate Windows' reserve/commit (see the module docs).
    const STRICT: bool = cfg!(debug_assertions);

    pub fn reserve(len: usize) -> Option<NonNull<u8>> {
        let prot = if STRICT { libc::PROT_NONE } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: an anonymous private mapping with no address hint has
        // no preconditions; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(p.cast::<u8>())
    }

    /// # Safety
    /// `p..p+len` lies inside one mapping made by `reserve`.
    pub unsafe fn commit(p: *mut u8, len: usize) -> bool {
        // SAFETY: the range is part of our own mapping (the caller's
        // contract); making it read-write affects nothing else.
        !STRICT || unsafe { libc::mprotect(p.cast(), len, libc::PROT_READ | libc::PROT_WRITE) } == 0
    }

    /// # Safety
    /// `p..p+len` is a whole mapping made by `reserve`, whose contents
    /// nobody reads before writing them again.
    pub unsafe fn decommit(p: *mut u8, len: usize) {
        // SAFETY: MADV_DONTNEED on our private anonymous mapping only drops
        // its pages (later reads see zeros); PROT_NONE makes any write that
        // was not committed first fault, as it would on Windows.
        unsafe {
            libc::madvise(p.cast(), len, libc::MADV_DONTNEED);
            if STRICT {
                libc::mprotect(p.cast(), len, libc::PROT_NONE);
            }
        }
    }

    /// # Safety
    /// `p`/`len` are exactly a mapping made by `reserve`, no longer used.
    pub unsafe fn free(p: *mut u8, len: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            libc::munmap(p.cast(), len);
        }
    }

    /// Whether [`forget`] keeps the pages (release builds).
    pub const KEEPS_PAGES: bool = !STRICT;

    /// Counts the pages of `p..p+len` as uncommitted again. Release builds
    /// keep them: a commit is no system call there, and the pages are
    /// writable already. Debug builds decommit, so the next user's
    /// uncommitted write still faults.
    ///
    /// # Safety
    /// As [`decommit`].
    pub unsafe fn forget(p: *mut u8, len: usize) {
        if STRICT {
            // SAFETY: the caller's contract.
            unsafe { decommit(p, len) }
        }
    }

    pub fn process_memory() -> Option<ProcessMemory> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|k| k * 1024)
        };
        Some(ProcessMemory { private_bytes: kib("RssAnon:")?, resident_bytes: kib("VmRSS:")? })
    }
}

#[cfg(windows)]
mod os {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::{Mutex, Once};
    use windows_sys::Win32::Foundation::EXCEPTION_ACCESS_VIOLATION;
    use windows_sys::Win32::System::Diagnostics::Debug::{
        AddVectoredExceptionHandler, EXCEPTION_CONTINUE_EXECUTION, EXCEPTION_CONTINUE_SEARCH, EXCEPTION_POINTERS,
    };
    use windows_sys::Win32::System::Memory::{
        MEM_COMMIT, MEM_DECOMMIT, MEM_RELEASE, MEM_RESERVE, PAGE_NOACCESS, PAGE_READWRITE, VirtualAlloc, VirtualFree,
    };

    /// Live regions, start → end, for the fault handler. Only ever locked
    /// for a lookup, an insert or a removal, none of which touches region
    /// memory, so a fault can never happen while this thread holds it.
    static LIVE: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());
    static HANDLER: Once = Once::new();

    fn live() -> std::sync::MutexGuard<'static, BTreeMap<usize, usize>> {
        LIVE.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn reserve(len: usize) -> Option<NonNull<u8>> {
        HANDLER.call_once(|| {
            // SAFETY: registering a handler function with the right
            // signature has no preconditions; it stays registered for the
            // life of the process.
            unsafe { AddVectoredExceptionHandler(0, Some(on_fault)) };
        });
        // SAFETY: a reservation with no address hint has no preconditions;
        // the result is checked for null.
        let p = unsafe { VirtualAlloc(std::ptr::null(), len, MEM_RESERVE, PAGE_NOACCESS) };
        let p = NonNull::new(p.cast::<u8>())?;
        live().insert(p.as_ptr() as usize, p.as_ptr() as usize + len);
        Some(p)
    }

    /// # Safety
    /// `p..p+len` lies inside one reservation made by `reserve`.
    pub unsafe fn commit(p: *mut u8, len: usize) -> bool {
        // SAFETY: committing pages of our own reservation.
        !unsafe { VirtualAlloc(p.cast(), len, MEM_COMMIT, PAGE_READWRITE) }.is_null()
    }

    /// # Safety
    /// `p..p+len` is a whole reservation made by `reserve`, whose contents
    /// nobody reads before writing them again.
    pub unsafe fn decommit(p: *mut u8, len: usize) {
        // SAFETY: decommitting our own pages (uncommitted ones included,
        // which MEM_DECOMMIT allows); the reservation stays.
        unsafe { VirtualFree(p.cast(), len, MEM_DECOMMIT) };
    }

    /// Commit charge is real here: a recycled region's pages are
    /// decommitted.
    pub use decommit as forget;
    pub const KEEPS_PAGES: bool = false;

    /// # Safety
    /// `p` is exactly a reservation made by `reserve`, no longer used.
    pub unsafe fn free(p: *mut u8, _len: usize) {
        live().remove(&(p as usize));
        // SAFETY: the caller's contract; MEM_RELEASE takes size 0 and the
        // base address of the reservation.
        unsafe { VirtualFree(p.cast(), 0, MEM_RELEASE) };
    }

    /// A write reached an uncommitted chunk of a live region: commit the
    /// chunk and let the write go on. Anything else is not ours.
    unsafe extern "system" fn on_fault(info: *mut EXCEPTION_POINTERS) -> i32 {
        // SAFETY: the system passes a valid record for the exception being
        // dispatched; it is only read.
        let record = unsafe { info.as_ref().and_then(|i| i.ExceptionRecord.as_ref()) };
        let Some(record) = record else { return EXCEPTION_CONTINUE_SEARCH };
        if record.ExceptionCode != EXCEPTION_ACCESS_VIOLATION || record.NumberParameters < 2 {
            return EXCEPTION_CONTINUE_SEARCH;
        }
        let addr = record.ExceptionInformation[1];
        let inside = live().range(..=addr).next_back().is_some_and(|(_, end)| addr < *end);
        if !inside {
            return EXCEPTION_CONTINUE_SEARCH;
        }
        let chunk = addr & !(CHUNK - 1);
        // SAFETY: the chunk lies in a live reservation (chunks are aligned
        // to CHUNK inside reservations, which start on a 64 KiB boundary).
        if unsafe { commit(chunk as *mut u8, CHUNK) } {
            FAULT_COMMITS.fetch_add(1, Ordering::Relaxed);
            #[cfg(test)]
            THREAD_FAULT_COMMITS.with(|c| c.set(c.get() + 1));
            EXCEPTION_CONTINUE_EXECUTION
        } else {
            EXCEPTION_CONTINUE_SEARCH
        }
    }

    pub fn process_memory() -> Option<ProcessMemory> {
        use windows_sys::Win32::System::ProcessStatus::{K32GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS};
        use windows_sys::Win32::System::Threading::GetCurrentProcess;
        let mut c =
            PROCESS_MEMORY_COUNTERS { cb: std::mem::size_of::<PROCESS_MEMORY_COUNTERS>() as u32, ..Default::default() };
        // SAFETY: `c` is a properly sized, writable counters structure;
        // the pseudo-handle of the current process needs no closing.
        let ok = unsafe { K32GetProcessMemoryInfo(GetCurrentProcess(), &mut c, c.cb) };
        (ok != 0)
            .then_some(ProcessMemory { private_bytes: c.PagefileUsage as u64, resident_bytes: c.WorkingSetSize as u64 })
    }
}

#[cfg(not(any(unix, windows)))]
mod os {
    use super::*;
    pub fn reserve(_: usize) -> Option<NonNull<u8>> {
        None
    }
    pub unsafe fn commit(_: *mut u8, _: usize) -> bool {
        false
    }
    pub unsafe fn decommit(_: *mut u8, _: usize) {}
    pub use decommit as forget;
    pub const KEEPS_PAGES: bool = false;
    pub unsafe fn free(_: *mut u8, _: usize) {}
    pub fn process_memory() -> Option<ProcessMemory> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_once_zeroed_and_writable_once_committed() {
        // SAFETY (every `split` in these tests): the slices are used only
        // while `r`, declared before them, is alive.
        let mut r = LazyRegion::new(1 << 20).unwrap();
        let (a, b) = unsafe { r.split(4096) }.unwrap();
        assert_eq!(a.len(), 4096);
        assert_eq!(b.len(), (1 << 20) - 4096);
        r.commit(0, 1 << 20).unwrap();
        assert!(a.iter().all(|x| *x == 0) && b.iter().all(|x| *x == 0));
        a[0] = 1;
        b[b.len() - 1] = 2;
        assert!(unsafe { r.split(10) }.is_none());
        assert!(LazyRegion::new(0).is_none());
    }

    /// What a recycled region keeps zeroes (Linux release builds): the
    /// chunks reported written, whole, and not the ones only committed.
    #[test]
    fn zeroes_the_chunks_reported_written() {
        let mut r = LazyRegion::new(6 * CHUNK).unwrap();
        let (a, _) = unsafe { r.split(6 * CHUNK) }.unwrap();
        r.commit(0, 6 * CHUNK).unwrap();
        a.fill(5);
        r.wrote(CHUNK - 1, 2);
        r.wrote(4 * CHUNK + 10, 0);
        r.wrote(5 * CHUNK + 3, 1);
        r.zero_written();
        let zeroed: Vec<bool> = a.chunks(CHUNK).map(|c| c.iter().all(|x| *x == 0)).collect();
        assert_eq!(zeroed, [true, true, false, false, false, true]);
        assert!(a.chunks(CHUNK).all(|c| c.iter().all(|x| *x == c[0])), "whole chunks");
        // Reports are forgotten once acted on.
        a.fill(5);
        r.zero_written();
        assert!(a.iter().all(|x| *x == 5));
    }

    #[test]
    fn commits_whole_chunks_once_and_counts_them() {
        let mut r = LazyRegion::new(8 * CHUNK + 100).unwrap();
        assert_eq!(r.committed(), 0);
        // A byte in chunk 1, then a span from chunk 1 into chunk 3.
        r.commit(CHUNK + 5, 1).unwrap();
        assert_eq!(r.committed(), CHUNK);
        r.commit(CHUNK + 10, 2 * CHUNK).unwrap();
        assert_eq!(r.committed(), 3 * CHUNK);
        // Nothing, beyond the end, and the ragged last chunk.
        r.commit(5, 0).unwrap();
        r.commit(r.len(), 10).unwrap();
        r.commit(8 * CHUNK, 1000).unwrap();
        assert_eq!(r.committed(), 4 * CHUNK);
        // A span around committed chunks commits the gaps (one call).
        r.commit(0, 6 * CHUNK).unwrap();
        assert_eq!(r.committed(), 7 * CHUNK);
        let (a, _) = unsafe { r.split(8 * CHUNK + 100) }.unwrap();
        a[..6 * CHUNK].fill(9);
        a[8 * CHUNK + 99] = 9;
        r.release();
        assert_eq!(r.committed(), 0);
        assert_eq!(r.offset_of(a.as_ptr()), Some(0));
        assert_eq!(r.offset_of(a[CHUNK..].as_ptr()), Some(CHUNK));
        assert_eq!(r.offset_of(std::ptr::null()), None);
        r.commit(0, 1).unwrap();
        assert_eq!(a[0], 0, "released memory reads as zeros");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn release_gives_the_pages_back() {
        // Resident pages of the region, from mincore.
        fn resident(r: &LazyRegion) -> usize {
            let pages = r.len.div_ceil(4096);
            let mut v = vec![0u8; pages];
            // SAFETY: the range is the region's mapping; `v` has a byte per page.
            let rc = unsafe { libc::mincore(r.ptr.as_ptr().cast(), r.len, v.as_mut_ptr().cast()) };
            assert_eq!(rc, 0);
            v.iter().filter(|b| **b & 1 != 0).count()
        }
        let mut r = LazyRegion::new(1 << 20).unwrap();
        let (a, _) = unsafe { r.split(1 << 19) }.unwrap();
        r.commit(0, 1 << 19).unwrap();
        a.fill(7);
        assert!(resident(&r) >= 128);
        r.release();
        assert_eq!(resident(&r), 0);
        r.commit(0, 1).unwrap();
        a[0] = 1;
        assert_eq!(resident(&r), 1, "committed again page by page");
        assert!(a[1..4096].iter().all(|x| *x == 0), "released pages read as zeros");
    }

    /// Windows: a write the caller did not commit is caught by the fault
    /// handler, which commits the chunk and counts it; the region stays
    /// usable, and a released region reads as zeros.
    #[cfg(windows)]
    #[test]
    fn the_fault_handler_commits_an_unforeseen_write() {
        let mut r = LazyRegion::new(4 * CHUNK).unwrap();
        let (a, b) = unsafe { r.split(2 * CHUNK) }.unwrap();
        r.commit(0, CHUNK).unwrap();
        a[0] = 1;
        let before = fault_commits_on_this_thread();
        b[5] = 7; // not committed
        assert_eq!(b[5], 7);
        assert_eq!(fault_commits_on_this_thread(), before + 1);
        assert!(fault_commits() > 0);
        r.release();
        r.commit(2 * CHUNK, 1).unwrap();
        assert_eq!(b[5], 0);
        // Some commit charge is counted for the process.
        assert!(process_memory().is_some_and(|m| m.private_bytes > 0));
    }

    /// Windows: an echo of loopback through IcmpSendEcho2 comes back with
    /// the payload sent.
    #[cfg(windows)]
    #[test]
    fn icmp_echo_of_loopback() {
        let data: Vec<u8> = (0..200u8).collect();
        match icmp_echo(std::net::Ipv4Addr::LOCALHOST, &data, std::time::Duration::from_secs(4)).unwrap() {
            EchoOutcome::Reply { from, data: got } => {
                assert_eq!(from, std::net::Ipv4Addr::LOCALHOST);
                assert_eq!(got, data);
            }
            other => panic!("no echo of 127.0.0.1: {other:?}"),
        }
    }

    /// Debug builds fault on a write the caller did not commit: the rule
    /// Windows enforces, checked here in a child process.
    #[cfg(all(target_os = "linux", debug_assertions))]
    #[test]
    fn an_uncommitted_write_faults_in_debug_builds() {
        if std::env::var_os("RDNET_SYS_FAULT_CHILD").is_some() {
            let mut r = LazyRegion::new(4 * CHUNK).unwrap();
            let (a, _) = unsafe { r.split(2 * CHUNK) }.unwrap();
            r.commit(0, CHUNK).unwrap();
            a[CHUNK - 1] = 1;
            a[CHUNK] = 1; // not committed: SIGSEGV
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args(["--exact", "sys::tests::an_uncommitted_write_faults_in_debug_builds", "--nocapture"])
            .env("RDNET_SYS_FAULT_CHILD", "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{out:?}");
    }
}
