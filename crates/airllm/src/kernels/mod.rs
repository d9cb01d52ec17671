//! The CPU compute kernels: `y = x Wᵀ` with `W` held in its file's form (dense in
//! [`matmul`], GGUF blocks in [`qmatmul`], and the AVX-512 VNNI prefill path for Q4_K and
//! Q6_K), tiled attention ([`attention`]) and Gated DeltaNet's recurrence ([`delta`]). They live apart from the model because they
//! know nothing of layers: they read weights as the file stores them and widen them inside the
//! product, so no widened copy of a matrix ever exists. What they share (the output pointer,
//! the tile of weight rows, the widened-tile gemm) is in one module that depends on none of
//! them.

pub mod attention;
mod common;
pub mod delta;
pub mod matmul;
pub mod mla;
pub mod mxfp4;
pub mod qmatmul;
#[cfg(target_arch = "x86_64")]
mod vnni;
