//! One error type for the engine. Every variant renders as a single line that names the file or
//! field at fault, because users see these messages directly from the CLI, and has a [`Kind`],
//! so a caller can tell bad input from a failed device, a budget too small, or a bug.

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
        budget = crate::units::fmt_bytes(*.budget),
        minimum = crate::units::fmt_bytes(*.minimum)
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

    /// The budget cannot hold what a request needs now (another sequence's KV cache).
    #[error("{0}")]
    NoRoom(String),

    /// The compute device failed, or is not in this build.
    #[error("device: {0}")]
    Device(String),

    /// A bug: a state the engine should never reach.
    #[error("internal error: {0}")]
    Internal(String),

    /// The caller stopped the work (Ctrl-C).
    #[error("interrupted")]
    Interrupted,

    /// The draft model named `spec` could not be used.
    #[error("draft {spec}: {source}")]
    Draft { spec: String, source: Box<Error> },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("weight reader stopped: {0}")]
    Reader(String),

    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// What kind of failure an error is, for callers that act on it (the Python module picks an
/// exception class, the server an HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The caller's arguments are wrong.
    Argument,
    /// The model named is not there.
    NotFound,
    /// The model's files are wrong: corrupt, truncated, inconsistent or unsupported.
    Model,
    /// The hub could not give the model.
    Hub,
    /// The budget is too small for what was asked.
    Budget,
    /// Reading the weights failed.
    Io,
    /// The compute device failed.
    Device,
    /// Stopped by the caller.
    Interrupted,
    /// A bug.
    Internal,
}

impl Error {
    pub fn kind(&self) -> Kind {
        use Error::*;
        match self {
            File { .. } | Config { .. } | Tensor { .. } | UnknownArch { .. } => Kind::Model,
            Tokenizer(_) | Template(_) => Kind::Model,
            ModelNotFound(..) => Kind::NotFound,
            Hub { .. } => Kind::Hub,
            BudgetTooSmall { .. } | NoRoom(_) => Kind::Budget,
            Invalid(_) => Kind::Argument,
            Reader(_) => Kind::Io,
            Device(_) => Kind::Device,
            Internal(_) => Kind::Internal,
            Interrupted => Kind::Interrupted,
            Draft { source, .. } => source.kind(),
            Candle(e) => candle_kind(e),
        }
    }

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
            NoRoom(m) => NoRoom(m.clone()),
            Device(m) => Device(m.clone()),
            Internal(m) => Internal(m.clone()),
            Interrupted => Interrupted,
            Draft { spec, source } => Draft {
                spec: spec.clone(),
                source: Box::new(source.duplicate()),
            },
            Tokenizer(m) => Tokenizer(m.clone()),
            Template(m) => Template(m.clone()),
            Reader(m) => Reader(m.clone()),
            Candle(e) => match candle_kind(e) {
                Kind::Device => Device(e.to_string()),
                _ => Internal(format!("tensor op: {e}")),
            },
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

/// A tensor op fails on a device that failed (CUDA), or on a bug: inputs are checked before
/// any op runs.
fn candle_kind(e: &candle_core::Error) -> Kind {
    use candle_core::Error as C;
    match e {
        C::Cuda(_) | C::NotCompiledWithCudaSupport => Kind::Device,
        C::WithBacktrace { inner, .. } | C::Context { inner, .. } => candle_kind(inner),
        C::Io(_) => Kind::Io,
        _ => Kind::Internal,
    }
}

pub type Result<T> = std::result::Result<T, Error>;
