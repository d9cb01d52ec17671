//! Positioned reads with accounting. Every byte the engine reads from a checkpoint goes through
//! [`Io::read_at`], which counts it (for the bytes-per-token and bandwidth figures of `bench`)
//! and, when asked, tells the kernel to drop the pages just read, so that streaming a model many
//! times the budget does not fill the page cache with it (a memory cgroup counts page cache).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Default)]
pub struct Io {
    bytes_read: AtomicU64,
    drop_cache: AtomicBool,
}

impl Io {
    pub fn read_at(&self, file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        file.read_exact_at(buf, at)?;
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if self.drop_cache.load(Ordering::Relaxed) && !buf.is_empty() {
            // Advisory: a failure only means the pages stay cached.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    at as i64,
                    buf.len() as i64,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        Ok(())
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Drop pages from the page cache after reading them.
    pub fn set_drop_cache(&self, on: bool) {
        self.drop_cache.store(on, Ordering::Relaxed);
    }
}

/// Threads that read (and widen) tensor chunks. With O_DIRECT a read costs no CPU, so more
/// threads than cores keep more requests in flight: 4 matched the buffered reader's speed with a
/// third of its system time on the development machine (docs/benchmarks.md).
/// `AIRLLM_IO_THREADS` overrides it.
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("AIRLLM_IO_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(4);
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("airllm-io-{i}"))
            .build()
            .expect("building the I/O thread pool")
    })
}

/// Threads in the I/O pool, each with its own staging buffer.
pub fn pool_threads() -> usize {
    pool().current_num_threads()
}

/// Alignment O_DIRECT needs for offsets, lengths and buffers.
pub const DIRECT_ALIGN: usize = 4096;

/// A heap buffer aligned for O_DIRECT, kept per thread and grown on demand.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

impl AlignedBuf {
    fn ensure(&mut self, n: usize) -> &mut [u8] {
        if n > self.cap {
            self.free();
            let layout =
                std::alloc::Layout::from_size_align(n, DIRECT_ALIGN).expect("valid layout");
            // SAFETY: n > 0 here; freed in `free` with the same layout.
            self.ptr = unsafe { std::alloc::alloc(layout) };
            if self.ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.cap = n;
        }
        // SAFETY: `ptr` owns `cap >= n` bytes; the bytes are only read after being filled by a
        // read, and u8 has no invalid values.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n) }
    }
    fn free(&mut self) {
        if !self.ptr.is_null() {
            let layout =
                std::alloc::Layout::from_size_align(self.cap, DIRECT_ALIGN).expect("valid layout");
            // SAFETY: allocated in `ensure` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

thread_local! {
    static DIRECT_BUF: std::cell::RefCell<AlignedBuf> =
        const { std::cell::RefCell::new(AlignedBuf { ptr: std::ptr::null_mut(), cap: 0 }) };
}

impl Io {
    /// Reads `[at, at + len)` from a file opened with O_DIRECT, through an aligned per-thread
    /// buffer, and hands the bytes to `f`. The kernel copies nothing into the page cache, so
    /// there is nothing to drop afterwards.
    pub fn read_direct<R>(
        &self,
        file: &File,
        at: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> std::io::Result<R> {
        let a = DIRECT_ALIGN as u64;
        let start = at / a * a;
        let end = (at + len as u64).next_multiple_of(a);
        let n = (end - start) as usize;
        DIRECT_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let buf = b.ensure(n);
            let mut got = 0usize;
            while got < n {
                match file.read_at(&mut buf[got..n], start + got as u64) {
                    Ok(0) => break, // the aligned end may lie past the end of the file
                    Ok(r) => got += r,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let lo = (at - start) as usize;
            if got < lo + len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file ended early",
                ));
            }
            self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
            Ok(f(&buf[lo..lo + len]))
        })
    }
}

/// Opens `path` for O_DIRECT reads, or `None` where the filesystem does not support it.
pub fn open_direct(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}
