//! The native half of the `airllm_rs` Python package: a model held by the engine, its tokenizer,
//! and generation on the scheduler. The Python half (`python/airllm_rs`) gives it AirLLM's and
//! transformers' shapes (tokenizer dicts, `.sequences`, numpy and torch inputs).
//!
//! Every sweep runs with the GIL released, so other Python threads go on while layers stream.
//! Errors carry the library's one-line messages.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use airllm::chat::{ChatTemplate, Message};
use airllm::generate::{Event, GenerationParams, Hook, Request, RequestId, SamplingParams};
use airllm::load::LoadOptions;
use airllm::session::{Session, SessionOptions, Workload};
use airllm::tokenizer::TextTokenizer;
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;

/// Streamed layers allocate and free hundreds of MB per token: the same huge-page allocator as
/// the CLI's (a shared library's Rust allocations use it; Python's own do not). Without it a
/// streamed decode step took twice as long (bench/python_api.py).
#[global_allocator]
static ALLOC: airllm::alloc::LargePageAlloc = airllm::alloc::LargePageAlloc;

create_exception!(
    airllm_rs,
    AirLLMError,
    PyRuntimeError,
    "A model that cannot be opened or run: a bad file, a budget too small, a failed download."
);

create_exception!(
    airllm_rs,
    BudgetError,
    AirLLMError,
    "The memory budget (max_memory or gpu_memory) is too small for what was asked."
);
create_exception!(
    airllm_rs,
    DeviceError,
    AirLLMError,
    "The compute device failed, or this build has no support for it."
);
create_exception!(
    airllm_rs,
    InternalError,
    AirLLMError,
    "A bug in airllm_rs: please report it with the message."
);

/// Each kind of library error as the Python exception a caller would catch.
fn py_err(e: airllm::Error) -> PyErr {
    use airllm::error::Kind;
    let msg = e.to_string();
    match e.kind() {
        Kind::NotFound => PyFileNotFoundError::new_err(msg),
        Kind::Argument => PyValueError::new_err(msg),
        Kind::Budget => BudgetError::new_err(msg),
        Kind::Device => DeviceError::new_err(msg),
        Kind::Internal => InternalError::new_err(msg),
        Kind::Interrupted => PyKeyboardInterrupt::new_err(msg),
        Kind::Model | Kind::Hub | Kind::Io => AirLLMError::new_err(msg),
    }
}

fn size(field: &str, s: Option<&str>) -> PyResult<Option<u64>> {
    s.map(|s| {
        airllm::util::parse_size(s).map_err(|_| {
            PyValueError::new_err(format!(
                "{field} `{s}`: expected a size such as 512MiB or 4GiB, or a byte count"
            ))
        })
    })
    .transpose()
}

/// One prompt's result as Python sees it: the new token ids, the EOS that ended them (if one
/// did), the text, and the finish reason.
type Generated = (Vec<u32>, Option<u32>, String, String);

/// The session (engine, scheduler, tokenizer); one sweep at a time.
struct Running {
    session: Session,
    /// A stream that has not finished owns the scheduler until it ends or is closed.
    streaming: bool,
}

/// A model opened for generation.
#[pyclass(module = "airllm_rs._airllm", frozen)]
struct Model {
    running: Arc<Mutex<Running>>,
    tok: Arc<TextTokenizer>,
    /// The chat template, or why there is none usable (raised by the chat calls only).
    template: Result<Arc<ChatTemplate>, String>,
    /// The memory plan: what stays resident, what streams, and the budget it fits.
    #[pyo3(get)]
    plan: String,
    /// The file or folder the weights come from (a hub model's snapshot in the cache).
    #[pyo3(get)]
    path: String,
    /// The architecture as transformers names it, e.g. `LlamaForCausalLM`.
    #[pyo3(get)]
    architecture: String,
    /// Tokens each sequence can hold, prompt and output together.
    #[pyo3(get)]
    max_seq_len: usize,
}

/// Takes a lock, releasing the GIL while it waits: the holder may be sweeping with the GIL
/// released and need it back before it lets go.
fn lock<'a, T>(py: Python<'_>, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
    m.lock_py_attached(py).unwrap_or_else(|e| e.into_inner())
}

/// Generation settings, from a dict with every key (the Python half fills in the defaults).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Settings {
    max_new_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    seed: Option<u64>,
    stop: Vec<String>,
}

impl Settings {
    /// Checked, with a seed from the clock when none was given.
    fn params(self) -> PyResult<GenerationParams> {
        let gp = GenerationParams {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed.unwrap_or_else(SamplingParams::clock_seed),
            },
            stop_strings: self.stop,
            ignore_eos: false,
        };
        gp.check().map_err(py_err)?;
        Ok(gp)
    }
}

#[pymethods]
impl Model {
    /// Opens `model` (a .gguf file, a folder, a hub repo id; `None` for the default model) and
    /// plans it under `max_memory` (e.g. "4GiB"; `None` takes 90% of available memory).
    #[new]
    #[pyo3(signature = (model=None, *, max_memory=None, device="cpu".to_string(), gpu_memory=None,
        compress=None, max_seq_len=None, max_batch=1, batch_size=512, revision=None, f16=false,
        cache_dir=None, progress=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: Option<String>,
        max_memory: Option<String>,
        device: String,
        gpu_memory: Option<String>,
        compress: Option<String>,
        max_seq_len: Option<usize>,
        max_batch: usize,
        batch_size: usize,
        revision: Option<String>,
        f16: bool,
        cache_dir: Option<std::path::PathBuf>,
        progress: bool,
    ) -> PyResult<Self> {
        let max_memory = size("max_memory", max_memory.as_deref())?;
        let gpu_memory = size("gpu_memory", gpu_memory.as_deref())?;
        if max_batch == 0 || batch_size == 0 {
            return Err(PyValueError::new_err(
                "max_batch and batch_size must be at least 1",
            ));
        }
        let compress = compress
            .as_deref()
            .map(airllm::load::compress_type)
            .transpose()
            .map_err(py_err)?;
        let opts = SessionOptions {
            load: LoadOptions {
                revision,
                compress,
                cache_dir,
                f16,
                progress,
            },
            max_memory,
            device: airllm::device::parse(&device).map_err(py_err)?,
            device_memory: gpu_memory,
            ..Default::default()
        };
        let work = Workload {
            context: max_seq_len,
            sequences: max_batch,
            prefill_chunk: batch_size,
            score_prompts: false,
        };
        // On a thread of its own, so Ctrl-C can stop the wait for a download or a conversion
        // (they go on in the background until they end; what they wrote is reused).
        let job = std::thread::spawn(move || Session::open(model.as_deref(), &opts, &work));
        while !job.is_finished() {
            py.detach(|| std::thread::sleep(std::time::Duration::from_millis(20)));
            py.check_signals()?;
        }
        let session = job
            .join()
            .map_err(|_| InternalError::new_err("internal error: loading the model panicked"))?
            .map_err(py_err)?;
        let tok = session
            .tokenizer()
            .cloned()
            .ok_or_else(|| AirLLMError::new_err("internal error: no tokenizer"))?;
        let template = ChatTemplate::of(&tok)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let engine = session.engine();
        Ok(Model {
            plan: engine.plan().to_string(),
            path: engine.dir().display().to_string(),
            architecture: engine.config().arch.hf_name().to_string(),
            max_seq_len: engine.options().context,
            tok,
            template,
            running: Arc::new(Mutex::new(Running {
                session,
                streaming: false,
            })),
        })
    }

    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.tok.bos_id
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.tok.eos_ids.clone()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.tok.vocab_size()
    }

    #[getter]
    fn has_chat_template(&self) -> bool {
        self.template.is_ok()
    }

    /// Token ids of `text`; with `add_special_tokens`, BOS where the model wants it.
    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        if add_special_tokens {
            self.tok.encode(text)
        } else {
            self.tok.encode_special(text)
        }
        .map_err(py_err)
    }

    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        if skip_special_tokens {
            self.tok.decode(&ids)
        } else {
            self.tok.decode_special(&ids)
        }
        .map_err(py_err)
    }

    /// The conversation (role, content pairs) rendered with the model's chat template, the
    /// assistant's turn opened.
    fn render_chat(&self, messages: Vec<(String, String)>) -> PyResult<String> {
        self.chat_template()?
            .render(&to_messages(&messages))
            .map_err(py_err)
    }

    /// Generates for each prompt (token ids), batched: each layer is read once per sweep for
    /// all of them. Returns `(new token ids, the EOS that ended them or None, text, finish
    /// reason)` per prompt.
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        settings: Settings,
    ) -> PyResult<Vec<Generated>> {
        let gp = settings.params()?;
        // Held for the whole batch, so another thread's batch waits its turn (with the GIL
        // released) instead of mixing its events with these.
        let mut guard = lock(py, &self.running);
        let r = &mut *guard;
        if r.streaming {
            return Err(busy());
        }
        let reqs = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Request {
                stream: i as u64,
                ..Request::new(p.clone(), gp.clone())
            })
            .collect();
        // Sweeps run with the GIL released; Ctrl-C between sweeps stops the batch and frees
        // its caches.
        let mut interrupted = None;
        let out = py.detach(|| {
            r.session.run(reqs, |h| {
                if let Hook::Swept(_) = h {
                    if let Err(e) = Python::attach(|py| py.check_signals()) {
                        interrupted = Some(e);
                        return Err(airllm::Error::Interrupted);
                    }
                }
                Ok(())
            })
        });
        if let Some(e) = interrupted {
            return Err(e);
        }
        Ok(out
            .map_err(py_err)?
            .into_iter()
            .map(|(c, _)| {
                (
                    c.token_ids,
                    c.eos,
                    c.text,
                    c.finish_reason.as_str().to_string(),
                )
            })
            .collect())
    }

    /// Starts generating for one prompt; the returned iterator yields text pieces as they
    /// become final (text that could still become a stop string is held back).
    fn stream(&self, py: Python<'_>, prompt: Vec<u32>, settings: Settings) -> PyResult<TextStream> {
        let gp = settings.params()?;
        let mut r = lock(py, &self.running);
        if r.streaming {
            return Err(busy());
        }
        r.streaming = true;
        let id = r.session.submit(Request::new(prompt, gp));
        Ok(TextStream {
            state: Mutex::new(StreamState {
                pieces: VecDeque::new(),
                done: false,
                token_ids: Vec::new(),
                finish_reason: None,
            }),
            running: self.running.clone(),
            id,
        })
    }
}

impl Model {
    fn chat_template(&self) -> PyResult<&ChatTemplate> {
        self.template
            .as_deref()
            .map_err(|e| AirLLMError::new_err(e.clone()))
    }
}

fn to_messages(m: &[(String, String)]) -> Vec<Message> {
    m.iter().map(|(r, c)| Message::new(r, c)).collect()
}

fn busy() -> PyErr {
    AirLLMError::new_err(
        "a stream of this model is still running: read it to the end or close() it first",
    )
}

struct StreamState {
    pieces: VecDeque<String>,
    done: bool,
    token_ids: Vec<u32>,
    finish_reason: Option<String>,
}

/// The text of one generation, piece by piece. Each `next()` runs sweeps (GIL released) until a
/// piece is final.
#[pyclass(module = "airllm_rs._airllm", frozen)]
struct TextStream {
    state: Mutex<StreamState>,
    running: Arc<Mutex<Running>>,
    id: RequestId,
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            {
                let mut st = lock(py, &self.state);
                if let Some(p) = st.pieces.pop_front() {
                    return Ok(Some(p));
                }
                if st.done {
                    return Ok(None);
                }
            }
            // Locks are taken in one order, the model's then the stream's, and the stream's is
            // not held during the sweep, so other threads can read it or close the stream.
            let mut guard = lock(py, &self.running);
            let r = &mut *guard;
            if lock(py, &self.state).done {
                continue; // closed while this thread waited for the model
            }
            let events = py.detach(|| r.session.step());
            let mut st = lock(py, &self.state);
            for ev in events {
                match ev {
                    Event::Tokens { id, text, .. } if id == self.id && !text.is_empty() => {
                        st.pieces.push_back(text)
                    }
                    Event::Done { id, completion, .. } if id == self.id => {
                        st.done = true;
                        st.token_ids = completion.token_ids;
                        st.finish_reason = Some(completion.finish_reason.as_str().to_string());
                    }
                    Event::Failed { id, error } if id == self.id => {
                        st.done = true;
                        r.streaming = false;
                        return Err(py_err(error));
                    }
                    _ => {}
                }
            }
            if r.session.is_idle() {
                st.done = true;
            }
            if st.done {
                r.streaming = false;
            }
            drop(st);
            drop(guard);
            // Signal handlers run with no lock held (one may close this stream).
            if let Err(e) = py.check_signals() {
                self.close(py);
                return Err(e);
            }
        }
    }

    /// Stops the generation and frees its cache.
    fn close(&self, py: Python<'_>) {
        let mut r = lock(py, &self.running);
        let mut st = lock(py, &self.state);
        if !st.done {
            st.done = true;
            r.session.cancel(self.id);
            r.streaming = false;
        }
    }

    /// The generated token ids, once the stream has ended.
    #[getter]
    fn token_ids(&self, py: Python<'_>) -> Vec<u32> {
        lock(py, &self.state).token_ids.clone()
    }

    /// `stop` or `length` once the stream has ended, else `None`.
    #[getter]
    fn finish_reason(&self, py: Python<'_>) -> Option<String> {
        lock(py, &self.state).finish_reason.clone()
    }
}

impl Drop for TextStream {
    /// A stream dropped before its end frees its cache and the model. Python drops objects
    /// with the GIL held, so attaching is free here.
    fn drop(&mut self) {
        Python::attach(|py| self.close(py));
    }
}

#[pymodule]
fn _airllm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<TextStream>()?;
    m.add("AirLLMError", m.py().get_type::<AirLLMError>())?;
    m.add("BudgetError", m.py().get_type::<BudgetError>())?;
    m.add("DeviceError", m.py().get_type::<DeviceError>())?;
    m.add("InternalError", m.py().get_type::<InternalError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    /// Downloads a hub model (ORG/NAME, ORG/NAME:QUANT, ORG/NAME/FILE.gguf) into the HF cache
    /// and returns the path to open.
    #[pyfunction]
    #[pyo3(signature = (model, revision=None, progress=true))]
    fn pull(
        py: Python<'_>,
        model: String,
        revision: Option<String>,
        progress: bool,
    ) -> PyResult<String> {
        py.detach(|| airllm::hub::update(&model, revision.as_deref(), progress))
            .map(|p| p.display().to_string())
            .map_err(py_err)
    }
    m.add_function(wrap_pyfunction!(pull, m)?)?;
    Ok(())
}
