//! Positioned reads with accounting. Every byte the engine reads from a checkpoint goes through
//! [`Io::read_into`] (matrices, O_DIRECT where possible) or [`Io::read_at`], which count it (for the bytes-per-token and bandwidth figures of `bench`)
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
    /// Read with buffered I/O even where O_DIRECT is open, so the page cache keeps the weights.
    no_direct: AtomicBool,
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

    /// Keep what is read in the page cache: buffered reads only, pages not dropped.
    pub fn keep_page_cache(&self) {
        self.no_direct.store(true, Ordering::Relaxed);
        self.drop_cache.store(false, Ordering::Relaxed);
    }
}

/// Threads that read tensor chunks. With O_DIRECT a read costs no CPU, so more
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

/// Alignment O_DIRECT needs for offsets, lengths and buffers.
pub const DIRECT_ALIGN: usize = super::buf::BUF_ALIGN;

/// Bytes per read request: several are in flight at once on the I/O pool. 4 MiB read the
/// 70B-shaped model about 10% faster than 2 MiB on the development machine.
pub const REQUEST: usize = 4 << 20;

/// Bytes [`Io::read_into`] needs in its buffer to read `len` bytes at any offset.
pub fn read_capacity(len: usize) -> usize {
    len + 2 * DIRECT_ALIGN
}

impl Io {
    /// Reads `[at, at + len)` of a file straight into `buf` (grown when too small) and returns
    /// where in `buf` byte `at` landed. With `direct` (the file opened with O_DIRECT) the read
    /// covers the enclosing aligned range, so the kernel copies nothing and the page cache does
    /// not grow; otherwise it is a buffered read at offset 0. The range is read in requests of
    /// 4 MiB spread over the I/O pool, so several are in flight.
    pub fn read_into(
        &self,
        file: &File,
        direct: Option<&File>,
        at: u64,
        len: usize,
        buf: &mut super::buf::AlignedBuf,
    ) -> std::io::Result<usize> {
        use rayon::prelude::*;
        let direct = direct.filter(|_| !self.no_direct.load(Ordering::Relaxed));
        if let Some(d) = direct {
            let a = DIRECT_ALIGN as u64;
            let start = at / a * a;
            let end = (at + len as u64).next_multiple_of(a);
            let n = (end - start) as usize;
            buf.ensure(n);
            let lo = (at - start) as usize;
            let r = pool().install(|| {
                buf.bytes_mut(n)
                    .par_chunks_mut(REQUEST)
                    .enumerate()
                    .try_for_each(|(i, chunk)| -> std::io::Result<()> {
                        let off = start + (i * REQUEST) as u64;
                        let mut got = 0usize;
                        while got < chunk.len() {
                            match d.read_at(&mut chunk[got..], off + got as u64) {
                                Ok(0) => break, // the aligned end may lie past the end of the file
                                Ok(r) => got += r,
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(e) => return Err(e),
                            }
                        }
                        let need = (lo + len).saturating_sub(i * REQUEST).min(chunk.len());
                        if got < need {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "file ended early",
                            ));
                        }
                        Ok(())
                    })
            });
            match r {
                Ok(()) => {
                    self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    return Ok(lo);
                }
                // Some filesystems accept O_DIRECT at open and refuse the reads: read buffered.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        buf.ensure(len);
        pool().install(|| {
            buf.bytes_mut(len)
                .par_chunks_mut(REQUEST)
                .enumerate()
                .try_for_each(|(i, chunk)| self.read_at(file, chunk, at + (i * REQUEST) as u64))
        })?;
        Ok(0)
    }
}

/// Opens `path` for O_DIRECT reads, or `None` where the filesystem does not support it or
/// `AIRLLM_NO_DIRECT_IO` is set.
pub fn open_direct(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::env::var_os("AIRLLM_NO_DIRECT_IO").is_some() {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}
