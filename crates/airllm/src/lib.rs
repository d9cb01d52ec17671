//! airllm: run language models larger than memory by streaming their weights from disk in slices
//! of each matrix, held in the file's form.
//!
//! The pipeline reads left to right: [`weights`] (checkpoint formats, O_DIRECT reads, the layer
//! schema, opening a model) → [`stream`] (the plan over tiers, placement, buffer pool,
//! background slice reader, residency) → [`model`] (the generic decoder block, on the CPU
//! kernels of [`kernels`]; a GPU behind [`device`]) → [`engine`] (one sweep over the layers for
//! a batch of sequences) → [`generate`] (the scheduler, sampling and stop rules). A
//! [`session::Session`] opens a model for a workload and is what every front end drives.

pub mod config;
pub mod convert;
pub mod device;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod model;
pub mod stream;
pub mod synth;
pub mod util;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use engine::{Engine, EngineOptions, LogitsFor, ModelInfo, Sequence};
pub use error::{Error, Result};
pub use session::{Session, SessionOptions, Workload};
pub mod alloc;
pub mod bench;
pub mod chat;
pub mod generate;
pub mod hub;
pub mod load;
pub mod session;
pub mod tokenizer;
pub mod units;
