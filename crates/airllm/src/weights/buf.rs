//! Aligned host buffers: what O_DIRECT reads land in and matrices are computed from, pinned for
//! a GPU's copies when a device asks. A leaf of `weights/`, so the reader and the matrix types
//! share it without depending on each other.

/// Alignment of every held buffer: what O_DIRECT needs, and more than any block type or SIMD
/// load wants.
pub const BUF_ALIGN: usize = 4096;

/// A heap buffer aligned to [`BUF_ALIGN`], for O_DIRECT reads straight into the memory a matrix
/// is computed from.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
    /// Registered with the GPU driver as pinned (page-locked) memory.
    pinned: bool,
}

/// Page-locks host buffers for a GPU: copies from pinned memory run asynchronously at the
/// link's full speed, while copies from pageable memory are staged through the driver and
/// block the caller.
pub trait HostPin: Send + Sync {
    /// Pins `len` bytes at `ptr`; false if the driver refused (the buffer then stays pageable).
    fn pin(&self, ptr: *mut u8, len: usize) -> bool;
    fn unpin(&self, ptr: *mut u8);
}

static PINNER: std::sync::OnceLock<Box<dyn HostPin>> = std::sync::OnceLock::new();

/// Buffers smaller than this are not worth a driver call to pin (norms, embedding rows).
const PIN_MIN: usize = 1 << 20;

/// From now on, large buffers are pinned when allocated. Set once, by the first GPU engine.
pub fn set_host_pinning(p: Box<dyn HostPin>) {
    let _ = PINNER.set(p);
}

// SAFETY: the buffer is plain owned memory; `&AlignedBuf` only gives shared reads.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
            pinned: false,
        }
    }
}

impl AlignedBuf {
    pub fn with_capacity(n: usize) -> Self {
        let mut b = AlignedBuf::default();
        b.ensure(n);
        b
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Makes room for `n` bytes (the contents are lost when it grows).
    pub fn ensure(&mut self, n: usize) {
        if n <= self.cap {
            return;
        }
        self.free();
        let layout = std::alloc::Layout::from_size_align(n, BUF_ALIGN).expect("valid layout");
        // Zeroed, so every byte handed out is initialised; for large buffers this is a fresh
        // mapping, which is zero anyway.
        // SAFETY: n > cap >= 0, so the layout is non-empty; freed in `free` with this layout.
        self.ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if self.ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        self.cap = n;
        if n >= PIN_MIN {
            if let Some(p) = PINNER.get() {
                self.pinned = p.pin(self.ptr, n);
            }
        }
    }
    /// Whether the buffer is page-locked for GPU copies.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }
    /// The first `n` bytes (zero where nothing was written).
    pub fn bytes(&self, n: usize) -> &[u8] {
        assert!(n <= self.cap);
        if n == 0 {
            return &[];
        }
        // SAFETY: `ptr` owns `cap >= n` bytes; u8 has no invalid values.
        unsafe { std::slice::from_raw_parts(self.ptr, n) }
    }
    pub fn bytes_mut(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.cap);
        if n == 0 {
            return &mut [];
        }
        // SAFETY: as in `bytes`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n) }
    }
    fn free(&mut self) {
        if !self.ptr.is_null() {
            if self.pinned {
                if let Some(p) = PINNER.get() {
                    p.unpin(self.ptr);
                }
                self.pinned = false;
            }
            let layout =
                std::alloc::Layout::from_size_align(self.cap, BUF_ALIGN).expect("valid layout");
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
