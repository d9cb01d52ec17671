//! One error type for the engine. Every variant renders as a single line that names the file or
//! field at fault, because users see these messages directly from the CLI.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    #[error("{}: field `{field}`: {msg}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },

    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    #[error("unsupported architecture `{arch}` in {}; supported: {supported}", path.display())]
    UnknownArch {
        path: PathBuf,
        arch: String,
        supported: String,
    },

    #[error("model `{0}` not found: {1}")]
    ModelNotFound(String, String),

    #[error(
        "{what} {budget} is below the minimum of {minimum} ({detail})",
        what = if *.device { "the device budget (gpu_memory)" } else { "the memory budget (max_memory)" },
        budget = crate::util::fmt_bytes(*.budget),
        minimum = crate::util::fmt_bytes(*.minimum)
    )]
    BudgetTooSmall {
        budget: u64,
        minimum: u64,
        detail: String,
        /// The device's budget rather than the host's.
        device: bool,
    },

    /// A model on the Hugging Face hub that cannot be fetched, and what to do about it.
    #[error("{repo}: {msg}")]
    Hub { repo: String, msg: String },

    #[error("invalid argument: {0}")]
    Invalid(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("weight reader stopped: {0}")]
    Reader(String),

    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// The same error again, for each of several requests one failure ends (a candle error
    /// becomes its message).
    pub fn duplicate(&self) -> Error {
        use Error::*;
        match self {
            File { path, msg } => File {
                path: path.clone(),
                msg: msg.clone(),
            },
            Config { path, field, msg } => Config {
                path: path.clone(),
                field: field.clone(),
                msg: msg.clone(),
            },
            Tensor { path, tensor, msg } => Tensor {
                path: path.clone(),
                tensor: tensor.clone(),
                msg: msg.clone(),
            },
            UnknownArch {
                path,
                arch,
                supported,
            } => UnknownArch {
                path: path.clone(),
                arch: arch.clone(),
                supported: supported.clone(),
            },
            ModelNotFound(a, b) => ModelNotFound(a.clone(), b.clone()),
            BudgetTooSmall {
                budget,
                minimum,
                detail,
                device,
            } => BudgetTooSmall {
                budget: *budget,
                minimum: *minimum,
                detail: detail.clone(),
                device: *device,
            },
            Hub { repo, msg } => Hub {
                repo: repo.clone(),
                msg: msg.clone(),
            },
            Invalid(m) => Invalid(m.clone()),
            Tokenizer(m) => Tokenizer(m.clone()),
            Template(m) => Template(m.clone()),
            Reader(m) => Reader(m.clone()),
            Candle(e) => Reader(format!("tensor op: {e}")),
        }
    }

    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(path: impl Into<PathBuf>, field: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }
    pub fn tensor(path: impl Into<PathBuf>, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
