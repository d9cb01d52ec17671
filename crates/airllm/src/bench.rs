//! Measurements for `airllm bench`: the disk's raw sequential read bandwidth on the model's own
//! files, taken in the same run as the engine's figures so the two can be compared.

use std::alloc::{alloc, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Reads up to `max_bytes` of `files` sequentially in 16 MiB requests and returns the bytes read
/// and the time taken. Uses O_DIRECT, so the page cache neither helps nor is filled; where the
/// filesystem refuses O_DIRECT it drops the files' cached pages first and reads buffered.
/// Returns whether O_DIRECT was used.
pub fn raw_read_bandwidth(files: &[PathBuf], max_bytes: u64) -> Result<(u64, Duration, bool)> {
    const CHUNK: usize = 16 << 20;
    let layout = Layout::from_size_align(CHUNK, 4096).expect("valid layout");
    // SAFETY: the layout is non-zero; the buffer is freed below on every path.
    let ptr = unsafe { alloc(layout) };
    if ptr.is_null() {
        return Err(Error::Invalid("cannot allocate the read buffer".into()));
    }
    // SAFETY: `ptr` points to CHUNK writable bytes owned by this function.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, CHUNK) };
    let mut total = 0u64;
    let mut direct = true;
    let t = Instant::now();
    let r = (|| -> Result<()> {
        for f in files {
            if total >= max_bytes {
                break;
            }
            let mut file = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(f)
            {
                Ok(file) => file,
                Err(_) => {
                    direct = false;
                    let file =
                        File::open(f).map_err(|e| Error::file(f, format!("cannot open: {e}")))?;
                    #[cfg(target_os = "linux")]
                    unsafe {
                        use std::os::unix::io::AsRawFd;
                        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                    }
                    file
                }
            };
            loop {
                let want = (max_bytes - total).min(CHUNK as u64) as usize;
                if want == 0 {
                    break;
                }
                // O_DIRECT needs whole aligned blocks; read a full chunk and count what came.
                let n = match file.read(&mut buf[..want.next_multiple_of(4096).min(CHUNK)]) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => return Err(Error::file(f, format!("read failed: {e}"))),
                };
                total += n as u64;
            }
        }
        Ok(())
    })();
    let elapsed = t.elapsed();
    // SAFETY: allocated above with the same layout.
    unsafe { dealloc(ptr, layout) };
    r.map(|_| (total, elapsed, direct))
}

/// Reads up to `max_bytes` of `files` with O_DIRECT in requests of the engine's size, `depth` in
/// flight at once (as the engine's reader keeps them), and returns the bytes read and the time
/// taken. A virtual or flash disk often reads faster with several requests queued than with
/// one, so this is the fairer "raw" for a reader that queues several. `None` where O_DIRECT is
/// refused or turned off.
pub fn raw_read_bandwidth_queued(
    files: &[PathBuf],
    max_bytes: u64,
    depth: usize,
) -> Result<Option<(u64, Duration)>> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    const REQ: u64 = crate::weights::io::REQUEST as u64;
    if std::env::var_os("AIRLLM_NO_DIRECT_IO").is_some() {
        return Ok(None);
    }
    let mut opened = Vec::new();
    let mut chunks = Vec::new();
    let mut planned = 0u64;
    for f in files {
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(f)
        else {
            return Ok(None);
        };
        let len = file
            .metadata()
            .map_err(|e| Error::file(f, format!("cannot stat: {e}")))?
            .len();
        let mut off = 0;
        while off < len && planned < max_bytes {
            chunks.push((opened.len(), off));
            off += REQ;
            planned += REQ;
        }
        opened.push(file);
    }
    let next = AtomicUsize::new(0);
    let total = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None);
    let refused = std::sync::atomic::AtomicBool::new(false);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..depth.max(1) {
            s.spawn(|| {
                let mut buf = crate::weights::mat::AlignedBuf::with_capacity(REQ as usize);
                let b = buf.bytes_mut(REQ as usize);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(fi, off)) = chunks.get(i) else {
                        return;
                    };
                    match opened[fi].read_at(b, off) {
                        Ok(n) => {
                            total.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // EINVAL: the filesystem took O_DIRECT at open but refuses the reads.
                            if e.raw_os_error() != Some(libc::EINVAL) {
                                *failed.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(Error::file(&files[fi], format!("read failed: {e}")));
                            } else {
                                refused.store(true, Ordering::Relaxed);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if refused.into_inner() {
        return Ok(None);
    }
    Ok(Some((total.into_inner(), t.elapsed())))
}
