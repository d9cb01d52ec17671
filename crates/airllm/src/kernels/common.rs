//! What the kernels share: the output pointer that parallel tasks write disjoint columns
//! through, the tile of weight rows, the widened-tile gemm and its single-threaded call, and
//! small SIMD and Q4_K helpers. Every kernel module depends on this one and on no kernel that
//! depends on it back.

use rayon::prelude::*;

/// Weight rows per gemm tile. Streamed slices are whole multiples of it.
pub const ROW_TILE: usize = 128;

/// `y`'s storage, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: every task writes a disjoint set of elements (its own output columns).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element `i` of `y` (a method, so closures capture the whole `Out`, which is `Send`).
    #[inline]
    pub(super) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

thread_local! {
    /// Widened weight tiles for the gemm path, reused across calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x · Wᵀ` into columns `col0 .. col0 + n` of `y`, a tile of [`ROW_TILE`] weight rows per
/// task: `direct` holds the weights as f32 `[n, k]` where they already are; otherwise
/// `widen(r, dst)` writes weight row `r` as f32 into a reused per-thread scratch.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_tiles(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    y: &mut [f32],
    ldy: usize,
    col0: usize,
    direct: Option<&[f32]>,
    widen: impl Fn(usize, &mut [f32]) + Sync,
) {
    let out = Out(y.as_mut_ptr());
    (0..n.div_ceil(ROW_TILE)).into_par_iter().for_each(|t| {
        let j0 = t * ROW_TILE;
        let nt = ROW_TILE.min(n - j0);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let rhs: *const f32 = match direct {
                Some(d) => d[j0 * k..].as_ptr(),
                None => {
                    if s.len() < nt * k {
                        s.resize(nt * k, 0.0);
                    }
                    for r in 0..nt {
                        widen(j0 + r, &mut s[r * k..(r + 1) * k]);
                    }
                    s.as_ptr()
                }
            };
            // SAFETY: x is [m, k]; rhs holds nt rows of k f32 values (so the product's
            // (l, j) is rhs[j·k + l]); the destination columns col0 + j0 .. + nt of every row
            // of y belong to this tile alone.
            unsafe {
                gemm1(
                    m,
                    nt,
                    k,
                    out.at(col0 + j0),
                    ldy,
                    false,
                    x.as_ptr(),
                    k,
                    rhs,
                    1,
                    k,
                )
            };
        });
    });
}

/// `d = a · b`, or `d += a · b` with `add`, on the calling thread: `a` is `[m, k]` with row
/// stride `lda`; `b`'s element (l, j) is at `b[l · b_rs + j · b_cs]`; `d` is `[m, n]` with row
/// stride `ldd`.
///
/// # Safety
/// The pointers cover those extents, and `d` overlaps neither `a` nor `b`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm1(
    m: usize,
    n: usize,
    k: usize,
    d: *mut f32,
    ldd: usize,
    add: bool,
    a: *const f32,
    lda: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    gemm_strided(m, n, k, d, ldd, add, a, lda, 1, b, b_rs, b_cs);
}

/// [`gemm1`] for any element type and any strides of `a`: element (i, l) of `a` is at
/// `a[i · a_rs + l · a_cs]`.
///
/// # Safety
/// As for [`gemm1`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided<T: 'static + From<f32>>(
    m: usize,
    n: usize,
    k: usize,
    d: *mut T,
    ldd: usize,
    add: bool,
    a: *const T,
    a_rs: usize,
    a_cs: usize,
    b: *const T,
    b_rs: usize,
    b_cs: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        d,
        1,
        ldd as isize,
        add,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::from(1.0),
        T::from(1.0),
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The sum of the eight lanes. Inlined: the kernels that call it live in other modules now.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// The 6-bit scale and minimum of run `j` from a Q4_K block's 12 packed scale bytes. Inlined
/// into the per-block loops of both Q4_K kernels.
#[inline]
pub(super) fn q4k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}
