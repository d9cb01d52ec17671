//! A global allocator for large buffers: streamed layers allocate and free hundreds of MB per
//! token, and with 4 KiB pages the kernel spends more time faulting pages in than the disk spends
//! reading them. Allocations from 1 MiB up get their own 2 MiB-aligned mapping marked for
//! transparent huge pages (512× fewer faults) and go straight back to the kernel when freed, so
//! resident memory follows the engine's ledger. Smaller ones use the system allocator.
//!
//! Install it in a binary with `#[global_allocator] static A: airllm::alloc::LargePageAlloc =
//! airllm::alloc::LargePageAlloc;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct LargePageAlloc;

/// Whether [`LargePageAlloc`] is the global allocator (it has allocated).
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Bytes this thread allocated less those it freed, through [`LargePageAlloc`]: per thread,
    /// so what other threads do meanwhile does not count in a [`measure`].
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

/// What an allocation of `size` takes from the process: whole pages for our mappings; for the
/// system allocator's chunks, a header word and rounding to 16 bytes (glibc's layout).
fn footprint(size: usize) -> i64 {
    if cfg!(target_os = "linux") && size >= LARGE {
        size.next_multiple_of(PAGE) as i64
    } else {
        (size + 8).next_multiple_of(16).max(32) as i64
    }
}

fn count(delta: i64) {
    // A thread's locals may be gone while it exits; its last frees need no counting.
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

fn live() -> i64 {
    LIVE.try_with(Cell::get).unwrap_or(0)
}

/// Runs `f` on this thread and returns what it left allocated: when [`LargePageAlloc`] is the
/// global allocator, its count of the bytes `f` allocated and did not free (deterministic, so
/// every process that builds the same thing counts the same; what `f` has other threads
/// allocate is not seen), else the growth of the resident set.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, u64) {
    if INSTALLED.load(Ordering::Relaxed) {
        let before = live();
        let r = f();
        let after = live();
        (r, after.saturating_sub(before).max(0) as u64)
    } else {
        let before = crate::util::rss().unwrap_or(0);
        let r = f();
        (r, crate::util::rss().unwrap_or(0).saturating_sub(before))
    }
}

const LARGE: usize = 1 << 20;
const HUGE: usize = 2 << 20;
const PAGE: usize = 4096;

#[cfg(target_os = "linux")]
unsafe fn map(size: usize) -> *mut u8 {
    // Map one huge page extra so the start can be aligned to a huge page, then trim.
    let len = size.next_multiple_of(HUGE) + HUGE;
    let p = libc::mmap(
        std::ptr::null_mut(),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let addr = p as usize;
    let start = addr.next_multiple_of(HUGE);
    // The mapping ends at the last 4 KiB page the buffer needs: only whole 2 MiB extents get
    // huge pages, so a buffer never holds up to 2 MiB of untouched tail.
    let end = start + size.next_multiple_of(PAGE);
    if start > addr {
        libc::munmap(p, start - addr);
    }
    if addr + len > end {
        libc::munmap(end as *mut libc::c_void, addr + len - end);
    }
    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    start as *mut u8
}

unsafe impl GlobalAlloc for LargePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        let p = if layout.size() >= LARGE && layout.align() <= HUGE {
            map(layout.size())
        } else {
            System.alloc(layout)
        };
        #[cfg(not(target_os = "linux"))]
        let p = System.alloc(layout);
        if !p.is_null() {
            count(footprint(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // Fresh anonymous mappings are already zero.
        #[cfg(target_os = "linux")]
        let p = if layout.size() >= LARGE && layout.align() <= HUGE {
            map(layout.size())
        } else {
            System.alloc_zeroed(layout)
        };
        #[cfg(not(target_os = "linux"))]
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(footprint(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-footprint(layout.size()));
        #[cfg(target_os = "linux")]
        if layout.size() >= LARGE && layout.align() <= HUGE {
            libc::munmap(
                ptr as *mut libc::c_void,
                layout.size().next_multiple_of(PAGE),
            );
            return;
        }
        System.dealloc(ptr, layout)
    }
}
