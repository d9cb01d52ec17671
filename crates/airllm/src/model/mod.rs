//! The model: one generic decoder block, RoPE and the KV cache. The kernels the block calls
//! (matmul over weights in the file's form, attention) are in [`crate::kernels`].

pub mod block;
pub mod kv;
pub(crate) mod linear;
pub(crate) mod mla;
pub mod rope;

pub use block::{Block, Matrices, SeqRows, Small};
pub use kv::LayerKv;
pub use rope::Rope;
