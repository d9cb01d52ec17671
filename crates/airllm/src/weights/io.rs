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

/// Threads that read (and widen) tensor chunks. Reads block in the kernel, so more threads than
/// cores could keep more requests in flight, but on the 2-core development machine 2 threads
/// measured fastest (docs/benchmarks.md); `AIRLLM_IO_THREADS` overrides it.
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("AIRLLM_IO_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(2);
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
