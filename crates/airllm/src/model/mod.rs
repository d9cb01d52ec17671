//! The model: one generic decoder block, its matmul over weights in the file's form, RoPE and
//! the KV cache.

pub mod attention;
pub mod block;
pub mod kv;
pub mod matmul;
pub mod qmatmul;
#[cfg(target_arch = "x86_64")]
mod qmatmul_vnni;
pub mod rope;

pub use block::{Block, Matrices, SeqRows, Small};
pub use kv::LayerKv;
pub use rope::Rope;
