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
