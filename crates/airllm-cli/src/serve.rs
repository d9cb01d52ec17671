//! `airllm serve`: an OpenAI-compatible HTTP server over one engine.
//!
//! One thread owns the engine and a [`Scheduler`]; HTTP handlers (axum on tokio) tokenize and
//! check a request, hand its sequences to that thread, and read the events back. Concurrent
//! requests therefore share each layer sweep: the point of a streaming engine, where a sweep
//! costs about the same for 1 sequence as for 16.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airllm::chat::{ChatTemplate, Harmony, Message};
use airllm::generate::{
    Event, GenerationParams, Request, RequestId, RequestStats, SamplingParams, TokenLogprob,
};
use airllm::tokenizer::TextTokenizer;
use airllm::Session;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Most bytes a request body may have.
pub const BODY_LIMIT: usize = 4 << 20;
/// Most choices (`n`) one request may ask for.
const MAX_N: usize = 16;
/// Most `top_logprobs` (OpenAI's own limit is 20).
const MAX_TOP_LOGPROBS: usize = 20;

/// A template for models without one (base models): plain "User:"/"Assistant:" turns.
const FALLBACK_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n\n{% elif m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: {{ m.content }}\n{% endif %}{% endfor %}Assistant:";

pub struct Config {
    pub model_id: String,
    pub api_key: Option<String>,
    /// Requests (counted in sequences) allowed to wait beyond the running ones.
    pub queue: usize,
}

/// Work for the engine thread: one HTTP request's sequences, and where their events go.
struct Job {
    reqs: Vec<Request>,
    events: mpsc::UnboundedSender<(usize, Msg)>,
}

/// A scheduler event as a handler sees it. A finished sequence stays on the engine thread and
/// is dropped there, so its KV cache is free for the next sweep's admissions.
enum Msg {
    Tokens {
        ids: Vec<u32>,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        completion: airllm::generate::Completion,
        stats: RequestStats,
    },
    Failed(String),
}

impl From<Event> for Msg {
    fn from(ev: Event) -> Self {
        match ev {
            Event::Tokens {
                tokens,
                text,
                logprobs,
                ..
            } => Msg::Tokens {
                ids: tokens,
                text,
                logprobs,
            },
            Event::Done {
                completion, stats, ..
            } => Msg::Done { completion, stats },
            Event::Failed { error, .. } => Msg::Failed(error.to_string()),
        }
    }
}

struct App {
    tok: Arc<TextTokenizer>,
    template: ChatTemplate,
    /// GPT-OSS's harmony format: chat answers split into `reasoning_content` and `content`.
    harmony: Option<Harmony>,
    model_id: String,
    context: usize,
    /// Token ids a prompt may hold: the tokenizer's and the embedding's, whichever is smaller.
    vocab: usize,
    api_key: Option<String>,
    /// Sequences admitted to the server, running or waiting, and the most it takes.
    in_flight: AtomicUsize,
    capacity: usize,
    jobs: std_mpsc::Sender<Job>,
    /// The scheduler's running and waiting sequences after its latest sweep, for /health.
    load: Arc<Load>,
}

#[derive(Default)]
struct Load {
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// Set when the engine thread has ended (only by a bug: it runs as long as the server).
    stopped: std::sync::atomic::AtomicBool,
}

/// Marks the engine stopped however its thread ends, a panic included.
struct StopMark<'a>(&'a Load);

impl Drop for StopMark<'_> {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Relaxed);
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
            retry_after: None,
        }
    }
    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            ..ApiError::bad(message, None)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.code,
        }});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Starts the engine thread and serves until Ctrl-C. Prints the address once listening.
pub fn serve(session: Session, cfg: Config, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let tok = session
        .tokenizer()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("internal error: a server session without a tokenizer"))?;
    let template_src = match tok.chat_template.clone() {
        Some(t) => t,
        None => {
            eprintln!(
                "serve: this model has no chat template; /v1/chat/completions uses plain \"User:\"/\"Assistant:\" turns. A base model's chat output may be meaningless: use /v1/completions for it."
            );
            FALLBACK_TEMPLATE.to_string()
        }
    };
    let harmony = Harmony::of(&tok);
    let template = ChatTemplate::new(
        &template_src,
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )?;
    let context = session.engine().options().context;
    let running = session.engine().options().max_batch.max(1);
    let vocab = session.engine().config().vocab_size.min(tok.vocab_size());
    let (jobs, rx) = std_mpsc::channel::<Job>();
    let load = Arc::new(Load::default());
    let engine_load = load.clone();
    std::thread::Builder::new()
        .name("airllm-engine".into())
        .spawn(move || engine_loop(session, rx, &engine_load))?;
    let app = Arc::new(App {
        tok,
        template,
        harmony,
        model_id: cfg.model_id,
        context,
        vocab,
        api_key: cfg.api_key,
        in_flight: AtomicUsize::new(0),
        capacity: running + cfg.queue,
        jobs,
        load,
    });
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), auth));
    let router = Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(|| async {
            ApiError::status(StatusCode::NOT_FOUND, "no such endpoint").with_code("not_found")
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "serve: listening on http://{} (context {context}, {running} sequences per sweep)",
            listener.local_addr()?
        );
        // Ctrl-C stops new connections; streams in progress get a few seconds to finish.
        let server = axum::serve(listener, router).with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let deadline = async {
            let _ = tokio::signal::ctrl_c().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        tokio::select! {
            r = server => r?,
            _ = deadline => eprintln!("serve: stopping with requests still running"),
        }
        anyhow::Ok(())
    })
}

/// The engine thread: takes jobs, runs sweeps while there is work, and routes each event to
/// its request. A request whose client went away is cancelled before the next sweep, which
/// frees its KV cache.
fn engine_loop(mut sched: Session, jobs: std_mpsc::Receiver<Job>, load: &Load) {
    let _mark = StopMark(load);
    let mut owners: HashMap<RequestId, (usize, mpsc::UnboundedSender<(usize, Msg)>)> =
        HashMap::new();
    loop {
        let first = if sched.is_idle() {
            match jobs.recv() {
                Ok(j) => Some(j),
                Err(_) => return, // the server is gone
            }
        } else {
            None
        };
        for job in first.into_iter().chain(jobs.try_iter()) {
            for (i, r) in job.reqs.into_iter().enumerate() {
                let id = sched.submit(r);
                owners.insert(id, (i, job.events.clone()));
            }
        }
        owners.retain(|&id, (_, tx)| {
            let open = !tx.is_closed();
            if !open {
                sched.cancel(id);
            }
            open
        });
        for ev in sched.step() {
            let id = ev.id();
            let end = !matches!(ev, Event::Tokens { .. });
            let Some((i, tx)) = owners.get(&id) else {
                continue;
            };
            if tx.send((*i, Msg::from(ev))).is_err() {
                sched.cancel(id);
                owners.remove(&id);
            } else if end {
                owners.remove(&id);
            }
        }
        let (running, waiting) = sched.load();
        load.running.store(running, Ordering::Relaxed);
        load.waiting.store(waiting, Ordering::Relaxed);
    }
}

/// Liveness, and the sequences running and waiting after the latest sweep.
async fn health(State(app): State<Arc<App>>) -> Response {
    if app.load.stopped.load(Ordering::Relaxed) {
        return ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
            .into_response();
    }
    Json(json!({
        "status": "ok",
        "running": app.load.running.load(Ordering::Relaxed),
        "waiting": app.load.waiting.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn auth(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: HttpRequest,
    next: Next,
) -> Response {
    if let Some(key) = &app.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::status(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send it as `Authorization: Bearer <key>`",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": app.model_id, "object": "model", "created": now(), "owned_by": "airllm",
        "context_length": app.context,
    }]}))
}

/// Seconds since the epoch (OpenAI's `created`).
fn now() -> u64 {
    now_nanos() as u64 / 1_000_000_000
}

/// Nanoseconds since the epoch: request ids and default seeds.
fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The sampling and limit fields both endpoints take.
#[derive(Deserialize, Default)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// 0 or -1 (vLLM's spelling) is off.
    top_k: Option<i64>,
    min_p: Option<f32>,
    #[serde(alias = "repetition_penalty")]
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany<String>>,
    n: Option<usize>,
    /// Extension (llama.cpp's server has it): generate past the end-of-sequence token.
    ignore_eos: Option<bool>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    /// An earlier answer's reasoning, as this server (and vLLM) returns it; `reasoning` is
    /// the name some clients send it back under.
    #[serde(alias = "reasoning")]
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    /// How long a reasoning model thinks (`low`, `medium`, `high`), for templates that take it.
    reasoning_effort: Option<String>,
    /// More variables for the chat template (vLLM's extension), e.g. `enable_thinking`.
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: PromptInput,
    logprobs: Option<usize>,
    echo: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

/// Which endpoint a request came through: it decides the response's shape.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// A checked request: its prompts, each run `n` times, and how to answer.
struct Prepared {
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    n: usize,
    params: GenerationParams,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Body) -> Result<T, ApiError> {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return Err(ApiError {
                status: e.status(),
                ..ApiError::bad(format!("cannot read the request body: {e}"), None)
            })
        }
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not a valid request: {e}"), None))
}

impl App {
    fn check_model(&self, c: &Common) -> Result<(), ApiError> {
        match &c.model {
            Some(m) if m != &self.model_id => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::bad(
                    format!(
                        "the model `{m}` does not exist; this server serves `{}`",
                        self.model_id
                    ),
                    Some("model"),
                )
                .with_code("model_not_found")
            }),
            _ => Ok(()),
        }
    }

    /// The request's generation settings, checked, with OpenAI's defaults (temperature 1,
    /// top_p 1); top_k, min_p and repeat_penalty are extensions, off unless given.
    fn prepare(
        &self,
        kind: Kind,
        prompts: Vec<Vec<u32>>,
        c: Common,
        logprobs: Option<usize>,
    ) -> Result<Prepared, ApiError> {
        self.check_model(&c)?;
        let temperature = c.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::bad(
                "temperature must be between 0 and 2",
                Some("temperature"),
            ));
        }
        let top_p = c.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p must be in (0, 1]", Some("top_p")));
        }
        let min_p = c.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad("min_p must be in [0, 1]", Some("min_p")));
        }
        let repeat = c.repeat_penalty.unwrap_or(1.0);
        if !(repeat.is_finite() && repeat > 0.0) {
            return Err(ApiError::bad(
                "repeat_penalty must be a number > 0",
                Some("repeat_penalty"),
            ));
        }
        let n = c.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::bad(
                format!("n must be between 1 and {MAX_N}"),
                Some("n"),
            ));
        }
        let stop = c.stop.map(OneOrMany::into_vec).unwrap_or_default();
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad(
                "stop takes up to 4 non-empty strings",
                Some("stop"),
            ));
        }
        if logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(ApiError::bad(
                format!("at most {MAX_TOP_LOGPROBS} top log-probabilities"),
                Some(if kind == Kind::Chat {
                    "top_logprobs"
                } else {
                    "logprobs"
                }),
            ));
        }
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(ApiError::bad(
                "the prompt is empty",
                Some(if kind == Kind::Chat {
                    "messages"
                } else {
                    "prompt"
                }),
            ));
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let asked = c.max_completion_tokens.or(c.max_tokens);
        let param = if c.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        if asked == Some(0) {
            return Err(ApiError::bad(
                format!("{param} must be at least 1"),
                Some(param),
            ));
        }
        let room = airllm::generate::scheduler::new_token_room(self.context, longest);
        if room == 0 || asked.is_some_and(|m| m > room as u64) {
            let what = match asked {
                Some(m) => format!("{longest} prompt tokens plus {param} {m}"),
                None => format!("{longest} prompt tokens"),
            };
            return Err(ApiError::bad(
                format!(
                    "{what} exceed this server's context of {} tokens (--ctx-size)",
                    self.context
                ),
                Some(if asked.is_some() {
                    param
                } else if kind == Kind::Chat {
                    "messages"
                } else {
                    "prompt"
                }),
            )
            .with_code("context_length_exceeded"));
        }
        let seed = c.seed.unwrap_or_else(|| now_nanos() as u64);
        Ok(Prepared {
            kind,
            prompts,
            n,
            params: GenerationParams {
                // OpenAI's defaults: 16 tokens for a completion, the context's rest for a chat.
                max_new_tokens: asked.map_or(
                    if kind == Kind::Text {
                        room.min(16)
                    } else {
                        room
                    },
                    |m| m as usize,
                ),
                sampling: SamplingParams {
                    temperature,
                    top_k: c.top_k.map_or(0, |k| k.max(0) as usize),
                    top_p,
                    min_p,
                    repetition_penalty: repeat,
                    seed,
                },
                stop_strings: stop,
                ignore_eos: c.ignore_eos.unwrap_or(false),
            },
            logprobs,
            stream: c.stream.unwrap_or(false),
            include_usage: c
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }

    /// Takes `n` sequences' room, or answers 429: the running sequences and the queue are
    /// full. The returned guard gives the room back when the response is done or dropped.
    fn admit(self: &Arc<Self>, n: usize) -> Result<Slot, ApiError> {
        let mut cur = self.in_flight.load(Ordering::Relaxed);
        loop {
            if cur + n > self.capacity {
                return Err(ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    retry_after: Some(1),
                    ..ApiError::bad(
                        format!(
                            "the server is busy: {cur} sequences running or queued, at most {}",
                            self.capacity
                        ),
                        None,
                    )
                    .with_code("rate_limit_exceeded")
                });
            }
            match self
                .in_flight
                .compare_exchange(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Ok(Slot {
                        app: self.clone(),
                        n,
                    })
                }
                Err(now) => cur = now,
            }
        }
    }
}

struct Slot {
    app: Arc<App>,
    n: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.app.in_flight.fetch_sub(self.n, Ordering::AcqRel);
    }
}

type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

async fn chat_completions(State(app): State<Arc<App>>, body: Body) -> Response {
    prepared(app, body, chat_request).await
}

async fn completions(State(app): State<Arc<App>>, body: Body) -> Response {
    prepared(app, body, completion_request).await
}

/// A chat request: the messages through the template, tokenized.
fn chat_request(app: &App, body: &Body) -> Result<Prepared, ApiError> {
    let b: ChatBody = parse(body)?;
    if b.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut msgs = Vec::with_capacity(b.messages.len());
    for m in &b.messages {
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                            ("text", Some(s)) => t.push_str(s),
                            (k, _) => {
                                return Err(ApiError::bad(
                                    format!("content parts of type `{k}` are not supported; this model reads text"),
                                    Some("messages"),
                                ))
                            }
                        }
                }
                t
            }
        };
        msgs.push(Message::new(&m.role, &text).with_thinking(m.reasoning_content.clone()));
    }
    let mut kwargs = b.chat_template_kwargs.clone().unwrap_or_default();
    match b.reasoning_effort.as_deref() {
        None => {}
        Some(e @ ("low" | "medium" | "high")) => {
            kwargs.insert("reasoning_effort".into(), json!(e));
        }
        Some(other) => {
            return Err(ApiError::bad(
                format!("reasoning_effort `{other}` is not one of low, medium, high"),
                Some("reasoning_effort"),
            ))
        }
    }
    let rendered = app.template.render_with(&msgs, &kwargs).map_err(|e| {
        ApiError::bad(
            format!("the chat template refused the messages: {e}"),
            Some("messages"),
        )
    })?;
    let ids = app.tok.encode_special(&rendered).map_err(|e| {
        ApiError::bad(
            format!("cannot tokenize the messages: {e}"),
            Some("messages"),
        )
    })?;
    let top = match (b.logprobs, b.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::bad(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ))
        }
        _ => None,
    };
    app.prepare(Kind::Chat, vec![ids], b.common, top)
}

/// A completion request: its prompts, tokenized or given as ids.
fn completion_request(app: &App, body: &Body) -> Result<Prepared, ApiError> {
    let b: CompletionBody = parse(body)?;
    if b.echo == Some(true) {
        return Err(ApiError::bad("echo is not supported", Some("echo")));
    }
    let vocab = app.vocab as u32;
    let enc = |t: &str| {
        app.tok
            .encode(t)
            .map_err(|e| ApiError::bad(format!("cannot tokenize the prompt: {e}"), Some("prompt")))
    };
    let prompts = match b.prompt {
        PromptInput::Text(t) => vec![enc(&t)?],
        PromptInput::Texts(ts) => ts.iter().map(|t| enc(t)).collect::<Result<_, _>>()?,
        PromptInput::Ids(ids) => vec![ids],
        PromptInput::IdLists(l) => l,
    };
    if prompts.iter().flatten().any(|&t| t >= vocab) {
        return Err(ApiError::bad(
            format!("a prompt token id is outside the vocabulary of {vocab}"),
            Some("prompt"),
        ));
    }
    app.prepare(Kind::Text, prompts, b.common, b.logprobs)
}

/// Parses, renders and tokenizes off the async workers (a 4 MiB body takes a while, and the
/// runtime's two threads carry every stream), then answers.
async fn prepared(
    app: Arc<App>,
    body: Body,
    read: fn(&App, &Body) -> Result<Prepared, ApiError>,
) -> Response {
    let a = app.clone();
    match tokio::task::spawn_blocking(move || read(&a, &body)).await {
        Ok(Ok(p)) => respond(app, p).await,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error while reading the request",
        )
        .into_response(),
    }
}

/// One choice's progress.
#[derive(Default)]
struct Choice {
    text: String,
    /// The generated ids (for the harmony split), and the bytes of each part already sent.
    ids: Vec<u32>,
    shown: (usize, usize),
    tokens: usize,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    stats: RequestStats,
    /// Text bytes the streamed logprobs have covered (`text_offset`).
    offset: usize,
}

/// What a response needs besides the choices: its id, the request's shape and its sizes.
struct Meta {
    id: String,
    kind: Kind,
    model: String,
    created: u64,
    prompt_tokens: usize,
    n: usize,
    logprobs: bool,
    include_usage: bool,
    started: Instant,
}

async fn respond(app: Arc<App>, p: Prepared) -> Response {
    let total = p.prompts.len() * p.n;
    if total > app.capacity {
        return ApiError::bad(
            format!(
                "{total} sequences (prompts × n) exceed the {} this server takes at once (--parallel plus --queue)",
                app.capacity
            ),
            Some("n"),
        )
        .into_response();
    }
    let slot = match app.admit(total) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let mut reqs = Vec::with_capacity(total);
    for prompt in &p.prompts {
        for j in 0..p.n {
            reqs.push(Request {
                stream: j as u64,
                logprobs: p.logprobs,
                ..Request::new(prompt.clone(), p.params.clone())
            });
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    if app.jobs.send(Job { reqs, events: tx }).is_err() {
        return ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
            .into_response();
    }
    let meta = Meta {
        id: format!(
            "{}-{:x}",
            if p.kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            now_nanos()
        ),
        kind: p.kind,
        model: app.model_id.clone(),
        created: now(),
        // Each prompt counts once, however many choices it has (as OpenAI counts).
        prompt_tokens: p.prompts.iter().map(Vec::len).sum::<usize>(),
        n: total,
        logprobs: p.logprobs.is_some(),
        include_usage: p.include_usage,
        started: Instant::now(),
    };
    if p.stream {
        stream_response(app, meta, rx, slot)
    } else {
        whole_response(app, meta, rx, slot).await
    }
}

/// Applies one event to its choice. Returns the text and logprobs that are new, or the
/// request's error.
fn apply(c: &mut Choice, ev: Msg) -> Result<(String, Vec<TokenLogprob>), String> {
    match ev {
        Msg::Tokens {
            ids,
            text,
            logprobs,
        } => {
            c.tokens += ids.len();
            c.ids.extend(ids);
            c.text.push_str(&text);
            c.logprobs.extend(logprobs.iter().cloned());
            Ok((text, logprobs))
        }
        Msg::Done { completion, stats } => {
            c.tokens = completion.token_ids.len();
            c.ids.clone_from(&completion.token_ids);
            // The final text may release what was held back for a stop string.
            let rest = completion
                .text
                .get(c.text.len()..)
                .unwrap_or_default()
                .to_string();
            c.text = completion.text;
            c.finish = Some(completion.finish_reason.as_str());
            c.stats = stats;
            Ok((rest, Vec::new()))
        }
        Msg::Failed(e) => Err(e),
    }
}

/// The reasoning and answer of a harmony choice that are new since the last call; a trailing
/// half character waits for the rest unless the choice has finished.
fn harmony_delta(app: &App, h: &Harmony, c: &mut Choice) -> (String, String) {
    let Ok(s) = h.split(&app.tok, &c.ids) else {
        return Default::default();
    };
    let done = c.finish.is_some();
    let part = |all: &str, shown: &mut usize| {
        let safe = if done {
            all.len()
        } else {
            all.trim_end_matches('\u{FFFD}').len()
        };
        let new = all
            .get(*shown..safe)
            .filter(|_| safe > *shown)
            .unwrap_or_default()
            .to_string();
        *shown = (*shown).max(safe);
        new
    };
    let (mut r, mut t) = c.shown;
    let out = (part(&s.reasoning, &mut r), part(&s.content, &mut t));
    c.shown = (r, t);
    out
}

fn usage(meta: &Meta, choices: &[Choice]) -> Value {
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    json!({"prompt_tokens": meta.prompt_tokens, "completion_tokens": completion,
           "total_tokens": meta.prompt_tokens + completion})
}

/// The `logprobs` object of a choice in the endpoint's format.
/// `offset` is where the first token's text starts in the completion (a stream's later chunks
/// go on from the earlier ones); it comes back advanced past these tokens.
fn logprobs_json(app: &App, kind: Kind, lps: &[TokenLogprob], offset: &mut usize) -> Value {
    // A special token shows as its text (`<|channel|>`), as vLLM reports it.
    let text = |t: u32| app.tok.decode_special(&[t]).unwrap_or_default();
    match kind {
        Kind::Chat => {
            let entry = |t: u32, lp: f32| {
                let s = text(t);
                json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
            };
            let content: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let mut e = entry(l.token, l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Kind::Text => {
            let mut offsets = Vec::new();
            let mut tokens = Vec::new();
            for l in lps {
                let s = text(l.token);
                offsets.push(*offset);
                *offset += s.len();
                tokens.push(s);
            }
            let tops: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let m: serde_json::Map<String, Value> =
                        l.top.iter().map(|&(t, lp)| (text(t), json!(lp))).collect();
                    Value::Object(m)
                })
                .collect();
            json!({"tokens": tokens, "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                   "top_logprobs": tops, "text_offset": offsets})
        }
    }
}

/// One line per request on stderr: tokens, queue wait, time to first token and speed.
fn log_request(meta: &Meta, choices: &[Choice], outcome: &str) {
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    let queued = choices
        .iter()
        .map(|c| c.stats.queued)
        .max()
        .unwrap_or_default();
    let first = choices.iter().filter_map(|c| c.stats.first_token).min();
    let secs = meta.started.elapsed().as_secs_f64();
    let decode = first.map_or(secs, |f| (secs - f.as_secs_f64()).max(1e-9));
    eprintln!(
        "{} {}: {} prompt + {} completion tokens, queued {:.2} s, first token {}, {:.1} tokens/s, {outcome}",
        meta.id,
        if meta.kind == Kind::Chat { "chat" } else { "completion" },
        meta.prompt_tokens,
        completion,
        queued.as_secs_f64(),
        first.map_or("-".into(), |f| format!("{:.2} s", f.as_secs_f64())),
        completion.saturating_sub(meta.n) as f64 / decode,
    );
}

async fn whole_response(
    app: Arc<App>,
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<(usize, Msg)>,
    _slot: Slot,
) -> Response {
    let mut choices: Vec<Choice> = (0..meta.n).map(|_| Choice::default()).collect();
    let mut left = meta.n;
    while left > 0 {
        let Some((i, ev)) = rx.recv().await else {
            break;
        };
        let Some(c) = choices.get_mut(i) else {
            continue;
        };
        match apply(c, ev) {
            Ok(_) => {
                if c.finish.is_some() {
                    left -= 1;
                }
            }
            Err(e) => {
                log_request(&meta, &choices, "failed");
                return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e).into_response();
            }
        }
    }
    if left > 0 {
        return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped")
            .into_response();
    }
    log_request(&meta, &choices, "done");
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = if meta.logprobs {
                logprobs_json(&app, meta.kind, &c.logprobs, &mut 0)
            } else {
                Value::Null
            };
            match (meta.kind, &app.harmony) {
                (Kind::Chat, Some(h)) => {
                    let s = h.split(&app.tok, &c.ids).unwrap_or_default();
                    json!({"index": i, "message": {"role": "assistant", "content": s.content,
                                "reasoning_content": s.reasoning},
                           "logprobs": lp, "finish_reason": c.finish})
                }
                (Kind::Chat, None) => {
                    json!({"index": i, "message": {"role": "assistant", "content": c.text},
                                     "logprobs": lp, "finish_reason": c.finish})
                }
                (Kind::Text, _) => json!({"index": i, "text": c.text, "logprobs": lp,
                                     "finish_reason": c.finish}),
            }
        })
        .collect();
    Json(json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": out,
        "usage": usage(&meta, &choices),
    }))
    .into_response()
}

/// A chunk of a streamed response.
fn chunk(meta: &Meta, choices: Vec<Value>, usage: Option<Value>) -> SseEvent {
    let mut v = json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    });
    if meta.include_usage {
        v["usage"] = usage.unwrap_or(Value::Null);
    }
    SseEvent::default().data(v.to_string())
}

fn stream_response(
    app: Arc<App>,
    meta: Meta,
    rx: mpsc::UnboundedReceiver<(usize, Msg)>,
    slot: Slot,
) -> Response {
    struct St {
        app: Arc<App>,
        meta: Meta,
        rx: mpsc::UnboundedReceiver<(usize, Msg)>,
        choices: Vec<Choice>,
        left: usize,
        opened: bool,
        /// Chunks still to send, then `[DONE]`.
        end: Option<Vec<SseEvent>>,
        _slot: Slot,
    }
    let st = St {
        app,
        choices: (0..meta.n).map(|_| Choice::default()).collect(),
        left: meta.n,
        meta,
        rx,
        opened: false,
        end: None,
        _slot: slot,
    };
    let s = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(rest) = st.end.as_mut() {
            return if rest.is_empty() {
                None
            } else {
                let e = rest.remove(0);
                Some((Ok::<_, std::convert::Infallible>(e), st))
            };
        }
        if st.meta.kind == Kind::Chat && !st.opened {
            st.opened = true;
            let first: Vec<Value> = (0..st.meta.n)
                .map(|i| {
                    json!({"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null})
                })
                .collect();
            let e = chunk(&st.meta, first, None);
            return Some((Ok(e), st));
        }
        loop {
            let Some((i, ev)) = st.rx.recv().await else {
                // The engine went away mid-request.
                st.end = Some(vec![
                    SseEvent::default().data(
                        json!({"error": {"message": "the engine stopped", "type": "server_error"}})
                            .to_string(),
                    ),
                    SseEvent::default().data("[DONE]"),
                ]);
                log_request(&st.meta, &st.choices, "failed");
                let e = st.end.as_mut().map(|v| v.remove(0))?;
                return Some((Ok(e), st));
            };
            let Some(c) = st.choices.get_mut(i) else {
                continue;
            };
            match apply(c, ev) {
                Err(msg) => {
                    log_request(&st.meta, &st.choices, "failed");
                    st.end = Some(vec![SseEvent::default().data("[DONE]")]);
                    let e = SseEvent::default().data(
                        json!({"error": {"message": msg, "type": "server_error"}}).to_string(),
                    );
                    return Some((Ok(e), st));
                }
                Ok((text, lps)) => {
                    let finish = c.finish;
                    let harmony = match (&st.app.harmony, st.meta.kind) {
                        (Some(h), Kind::Chat) => Some(harmony_delta(&st.app, h, c)),
                        _ => None,
                    };
                    let quiet = match &harmony {
                        Some((r, t)) => r.is_empty() && t.is_empty(),
                        None => text.is_empty(),
                    };
                    if quiet && lps.is_empty() && finish.is_none() {
                        continue;
                    }
                    let lp = if st.meta.logprobs && !lps.is_empty() {
                        logprobs_json(&st.app, st.meta.kind, &lps, &mut c.offset)
                    } else {
                        Value::Null
                    };
                    let choice = match st.meta.kind {
                        Kind::Chat => {
                            let mut delta = json!({});
                            match harmony {
                                Some((r, t)) => {
                                    if !r.is_empty() {
                                        delta["reasoning_content"] = json!(r);
                                    }
                                    if !t.is_empty() {
                                        delta["content"] = json!(t);
                                    }
                                }
                                None if !text.is_empty() => delta["content"] = json!(text),
                                None => {}
                            }
                            json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
                        }
                        Kind::Text => {
                            json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
                        }
                    };
                    let e = chunk(&st.meta, vec![choice], None);
                    if finish.is_some() {
                        st.left -= 1;
                        if st.left == 0 {
                            log_request(&st.meta, &st.choices, "done");
                            let mut rest = Vec::new();
                            if st.meta.include_usage {
                                let u = usage(&st.meta, &st.choices);
                                rest.push(chunk(&st.meta, vec![], Some(u)));
                            }
                            rest.push(SseEvent::default().data("[DONE]"));
                            st.end = Some(rest);
                        }
                    }
                    return Some((Ok(e), st));
                }
            }
        }
    });
    Sse::new(s)
        .keep_alive(axum::response::sse::KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
