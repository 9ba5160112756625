//! Memory for TCP socket buffers that costs only what is used.
//!
//! A flow's smoltcp buffers are large (so one fast flow can fill a long fat
//! pipe) but most flows move little. On Unix the buffers live in one private
//! anonymous mapping per flow: the kernel commits a page only when it is
//! first written, so a quiet flow costs a page or two of each buffer, not
//! their full size. Elsewhere a zeroed heap allocation is used.
//! The only module of this crate allowed `unsafe`.
#![allow(unsafe_code)]

use std::ptr::NonNull;

/// A zero-filled memory region, split into two `'static` slices for a
/// flow's receive and transmit buffers.
///
/// The slices claim `'static` because smoltcp's `SocketSet<'static>` needs
/// it; they are only valid while the region lives. The owner must drop
/// whatever holds them (the flow's socket set) before the region: `FlowState`
/// declares its socket set before its region, so fields drop in that order.
pub struct LazyRegion {
    ptr: NonNull<u8>,
    len: usize,
    handed_out: bool,
}

impl LazyRegion {
    /// Maps `len` bytes; `None` if the system refuses.
    pub fn new(len: usize) -> Option<Self> {
        if len == 0 {
            return None;
        }
        #[cfg(unix)]
        {
            // SAFETY: an anonymous private mapping with no address hint has
            // no preconditions; the result is checked for MAP_FAILED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return None;
            }
            NonNull::new(p.cast::<u8>()).map(|ptr| LazyRegion { ptr, len, handed_out: false })
        }
        #[cfg(not(unix))]
        {
            let layout = std::alloc::Layout::from_size_align(len, 4096).ok()?;
            // SAFETY: the layout has a non-zero size (checked above).
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            NonNull::new(p).map(|ptr| LazyRegion { ptr, len, handed_out: false })
        }
    }

    /// Splits the region at `at` into two disjoint slices. Only once: a
    /// second call returns `None`, so no two live `&mut` can alias.
    pub fn split(&mut self, at: usize) -> Option<(&'static mut [u8], &'static mut [u8])> {
        if self.handed_out || at > self.len {
            return None;
        }
        self.handed_out = true;
        // SAFETY: the region is `len` valid, zero-initialised, writable bytes
        // owned by `self`; the two slices are disjoint and handed out once.
        // Their `'static` lifetime is the documented contract of this type:
        // the holder drops them before the region (see the type's docs).
        unsafe {
            let a = std::slice::from_raw_parts_mut(self.ptr.as_ptr(), at);
            let b = std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), self.len - at);
            Some((a, b))
        }
    }
}

impl LazyRegion {
    /// Gives the region's pages back to the system: they read as zeros
    /// again and are committed anew when next written. Only for a region
    /// whose contents nobody will read: a flow calls it while both of its
    /// socket buffers are empty.
    pub fn release(&self) {
        #[cfg(unix)]
        // SAFETY: `ptr`/`len` are exactly what mmap returned and stay
        // mapped; MADV_DONTNEED on a private anonymous mapping only drops
        // its pages (later reads see zeros), which the caller's contract
        // makes harmless.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
        }
    }
}

impl Drop for LazyRegion {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: `ptr`/`len` are exactly what mmap returned; the slices
        // into it are gone by the type's contract.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
        #[cfg(not(unix))]
        // SAFETY: allocated in `new` with this very layout.
        unsafe {
            if let Ok(layout) = std::alloc::Layout::from_size_align(self.len, 4096) {
                std::alloc::dealloc(self.ptr.as_ptr(), layout);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_once_zeroed_and_writable() {
        let mut r = LazyRegion::new(1 << 20).unwrap();
        let (a, b) = r.split(4096).unwrap();
        assert_eq!(a.len(), 4096);
        assert_eq!(b.len(), (1 << 20) - 4096);
        assert!(a.iter().all(|x| *x == 0) && b.iter().all(|x| *x == 0));
        a[0] = 1;
        b[b.len() - 1] = 2;
        assert!(r.split(10).is_none());
        assert!(LazyRegion::new(0).is_none());
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
        let (a, _) = r.split(1 << 19).unwrap();
        a.fill(7);
        assert!(resident(&r) >= 128);
        r.release();
        assert_eq!(resident(&r), 0);
        a[0] = 1;
        assert_eq!(resident(&r), 1, "committed again page by page");
        assert!(a[1..].iter().all(|x| *x == 0), "released pages read as zeros");
    }
}
