//! A guard against one known way a client can abort the process.
//!
//! kafka-protocol 0.18 decodes an array by calling `Vec::with_capacity(n)` with `n` read from
//! the wire before checking that `n` elements could fit in the frame (upstream pull requests
//! #152/#161/#200 are open). A 20-byte request declaring 2^31 elements then asks for hundreds
//! of GiB, the allocator refuses, and Rust aborts: no panic to catch, every client gone.
//!
//! This allocator serves allocations of 1 GiB and more with `mmap(MAP_NORESERVE)`: address
//! space is reserved but no memory is committed until written. The decoder fails on the short
//! buffer after at most a few elements, the `Vec` is dropped and the mapping released; the
//! request gets a decode error like any other malformed input. Smaller allocations (every
//! legitimate one: frames are bounded by `max_frame_bytes`) go to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

const HUGE: usize = 1 << 30;
const PAGE: usize = 4096;

static HUGE_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// How many allocations took the reserved-address-space path (exported as a metric).
pub fn huge_allocations() -> u64 {
    HUGE_ALLOCATIONS.load(Ordering::Relaxed)
}

pub struct GuardedAlloc;

fn is_huge(layout: &Layout) -> bool {
    layout.size() >= HUGE && layout.align() <= PAGE
}

unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !is_huge(&layout) {
            return unsafe { System.alloc(layout) };
        }
        // SAFETY: anonymous private mapping; no file descriptor or existing memory involved.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        HUGE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        p as *mut u8
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_huge(&layout) {
            // Anonymous mappings are zero-filled.
            unsafe { self.alloc(layout) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_huge(&layout) {
            // SAFETY: `ptr` came from the mmap above with this exact size.
            unsafe { libc::munmap(ptr as *mut libc::c_void, layout.size()) };
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = match Layout::from_size_align(new_size, layout.align()) {
            Ok(l) => l,
            Err(_) => return std::ptr::null_mut(),
        };
        if !is_huge(&layout) && !is_huge(&new_layout) {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if is_huge(&layout) && is_huge(&new_layout) {
            // Move the mapping instead of copying (and so committing) gigabytes.
            // SAFETY: `ptr` is a mapping of `layout.size()` bytes made by `alloc`.
            let p = unsafe {
                libc::mremap(
                    ptr as *mut libc::c_void,
                    layout.size(),
                    new_size,
                    libc::MREMAP_MAYMOVE,
                )
            };
            return if p == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                p as *mut u8
            };
        }
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_allocation_is_reserved_not_committed_and_released() {
        let a = GuardedAlloc;
        let layout = Layout::from_size_align(64 << 30, 8).unwrap(); // 64 GiB
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            // Touch a few bytes: only those pages become real memory.
            *p = 1;
            *p.add((64 << 30) - 1) = 2;
            let bigger = a.realloc(p, layout, (64 << 30) + 4096);
            assert!(!bigger.is_null());
            assert_eq!(*bigger, 1);
            a.dealloc(
                bigger,
                Layout::from_size_align((64 << 30) + 4096, 8).unwrap(),
            );
        }
    }

    #[test]
    fn small_allocations_use_the_system_allocator() {
        let a = GuardedAlloc;
        let layout = Layout::from_size_align(100, 8).unwrap();
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            let q = a.realloc(p, layout, 200);
            assert!(!q.is_null());
            a.dealloc(q, Layout::from_size_align(200, 8).unwrap());
        }
    }
}
