//! The model: one generic decoder block, RoPE, the KV cache, and the layer weights it computes on.

pub mod block;
pub mod kv;
pub mod rope;

pub use block::{Block, LayerWeights, SeqRows};
pub use kv::LayerKv;
pub use rope::Rope;
