//! The engine: model registry, GGUF loading, tokenizer and chat template, sampling, and the
//! scheduler that owns each model.
//!
//! The seam the request pipeline uses is [`Backend`]: a validated [`GenerateRequest`] goes
//! into the model's queue and comes back as a [`TokenStream`], a channel of
//! [`StreamEvent`]s. Dropping the stream cancels the generation at the next step. Nothing
//! here knows HTTP.

pub mod attention;
pub mod grammar;
pub mod model;
pub mod ops;
pub mod qgemm;
pub mod remote;
pub mod sampling;
pub mod scheduler;
pub mod template;
pub mod tokenizer;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::Device;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::config::{Config, DeviceSpec, Limits, ModelConfig, parse_hf};
use crate::telemetry::Metrics;
use grammar::{Constraint, Grammars};
use model::{Family, Hparams, Model};
use sampling::SamplingParams;
use scheduler::Scheduler;
use template::{ChatTemplate, TemplateError, TemplateMessage};
use tokenizer::GgufTokenizer;

/// Fixes the CPU thread count for the process, before any thread starts.
///
/// candle asks for its thread count on every f32 matmul (attention) and, unless
/// `RAYON_NUM_THREADS` is set, answers by parsing /proc/cpuinfo each time: measured here,
/// 2,380 reads of it in a 48-token run, ~3 % of decode. Setting the variable once to the
/// same answer makes that an environment lookup. An operator's own value is kept.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: called first thing in `main`, while the process has one thread.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("model `{id}` failed to load: {message}")]
    Load { id: String, message: String },
    #[error("the engine for `{0}` is overloaded (queue full); retry later")]
    Overloaded(String),
    #[error("the engine for `{0}` has stopped")]
    Stopped(String),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Grammar(#[from] grammar::GrammarError),
    /// Proxy mode: no upstream could take the request.
    #[error("no upstream of `{id}` could take the request (last: {message})")]
    UpstreamUnavailable { id: String, message: String },
    /// Proxy mode: the upstream refused the request itself (a 400, 413 or 422).
    #[error("the upstream refused the request: {message}")]
    UpstreamRefused { status: u16, message: String },
}

/// A prompt in the form its backend takes it.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Token ids: the local engine's prompt (the chat template already applied), or a
    /// completions prompt a client gave as ids.
    Tokens(Vec<u32>),
    /// A conversation, for a backend that applies its own chat template (proxy mode), with
    /// an estimate of its tokens.
    Messages { messages: Vec<TemplateMessage>, estimated_tokens: usize },
    /// Raw completions text, for a backend that tokenizes it itself (proxy mode).
    Text { text: String, estimated_tokens: usize },
}

impl Prompt {
    /// Its length in tokens (estimated where the backend tokenizes).
    pub fn len(&self) -> usize {
        match self {
            Prompt::Tokens(ids) => ids.len(),
            Prompt::Messages { estimated_tokens, .. } | Prompt::Text { estimated_tokens, .. } => *estimated_tokens,
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Prompt::Tokens(ids) => ids.is_empty(),
            Prompt::Messages { messages, .. } => messages.is_empty(),
            Prompt::Text { text, .. } => text.is_empty(),
        }
    }

    /// The ids of a token prompt; empty for the others (only remote backends take those).
    pub fn tokens(&self) -> &[u32] {
        match self {
            Prompt::Tokens(ids) => ids,
            _ => &[],
        }
    }
}

/// A request the api has validated: token ids and settings within the model's limits.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// New tokens to generate at most; prompt + max_tokens fits the context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop strings: output ends before the first one that appears.
    pub stop: Vec<String>,
    /// What the reply must be (a JSON schema); enforced on every sampled token.
    pub constraint: Option<Constraint>,
    /// When the api accepted the request, for queue-time metrics.
    pub received: Instant,
    /// The request's span (its id): the engine's queue, prefill and decode spans hang
    /// under it, though they run on the model's thread.
    pub span: tracing::Span,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What flows out of the engine for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// One generated token and the text that became final with it (possibly empty: the
    /// detokenizer or the stop matcher may hold text back).
    Token { id: u32, text: String, logprob: Option<TokenLogprob> },
    /// The end: text still held back, why it ended, and exact token counts.
    Finished { text: String, reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    /// The engine failed on this request after it was accepted.
    Error(String),
}

/// The receiving end of one generation; dropping it cancels the request.
pub type TokenStream = mpsc::UnboundedReceiver<StreamEvent>;

/// A model ready to serve: tokenizer, template and the handle of its scheduler.
pub struct LoadedModel {
    pub id: String,
    pub family: Family,
    pub tokenizer: Arc<GgufTokenizer>,
    template: ChatTemplate,
    /// The template is the model's own (GGUF or config), not wisp's built-in fallback.
    pub own_template: bool,
    /// Longest prompt + completion, in tokens.
    pub context_length: usize,
    scheduler: Scheduler,
    /// The compiler of response formats, built on the first constrained request.
    grammars: std::sync::OnceLock<Result<Grammars, String>>,
}

/// What the request pipeline needs of a model, whoever serves it: the seam between
/// `pipeline` and whatever generates (TGI's router calls its seam `Infer`).
///
/// The pipeline renders and tokenizes through the backend (to check the context, to show
/// plugins the prompt's size, to prune a session's history) and hands it a validated
/// [`GenerateRequest`]; the backend answers with a [`TokenStream`] of [`StreamEvent`]s,
/// and dropping that stream cancels the generation. [`LoadedModel`] is the local backend
/// (a candle model on its own scheduler thread); a remote one (proxy mode) forwards the
/// same request and translates the remote's stream into the same events.
pub trait Backend: Send + Sync + 'static {
    /// The model id clients name.
    fn id(&self) -> &str;
    /// Longest prompt + completion, in tokens; `None` where the backend does not know it
    /// (an upstream enforces its own).
    fn context_length(&self) -> Option<usize>;
    /// Token ids run from 0 to this, exclusive (`logit_bias` keys are checked against it);
    /// `None` where an upstream checks them.
    fn vocab_size(&self) -> Option<usize>;
    /// A conversation as this backend takes it: rendered with the model's chat template
    /// and tokenized (local), or the messages themselves (an upstream applies its own).
    fn chat_prompt(&self, messages: Vec<TemplateMessage>) -> Result<Prompt, TemplateError>;
    /// A raw completions prompt (with the model's BOS where it takes one).
    fn text_prompt(&self, text: String) -> Prompt;
    /// Text of token ids, special tokens skipped; `None` without a tokenizer.
    fn decode(&self, ids: &[u32]) -> Option<String>;
    /// Served by upstreams (proxy mode): no token ids or logprobs come back.
    fn is_remote(&self) -> bool {
        false
    }
    /// Starts a generation; the stream yields its tokens as they are generated.
    fn generate(self: Arc<Self>, request: GenerateRequest) -> BoxFuture<'static, Result<TokenStream, EngineError>>;
}

impl Backend for LoadedModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn context_length(&self) -> Option<usize> {
        Some(self.context_length)
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.tokenizer.vocab_size())
    }

    fn chat_prompt(&self, messages: Vec<TemplateMessage>) -> Result<Prompt, TemplateError> {
        Ok(Prompt::Tokens(self.encode(&self.template.render(&messages, true)?, false)))
    }

    fn text_prompt(&self, text: String) -> Prompt {
        Prompt::Tokens(self.encode(&text, true))
    }

    fn decode(&self, ids: &[u32]) -> Option<String> {
        Some(self.tokenizer.tokenizer.decode(ids, true).unwrap_or_default())
    }

    fn generate(self: Arc<Self>, request: GenerateRequest) -> BoxFuture<'static, Result<TokenStream, EngineError>> {
        Box::pin(async move {
            if !matches!(request.prompt, Prompt::Tokens(_)) {
                return Err(EngineError::Load { id: self.id.clone(), message: "the local engine takes token ids; this is a bug".into() });
            }
            match &request.constraint {
                // Compiling a response format (and, the first time, the vocabulary's trie)
                // is CPU work: off the async executor.
                Some(_) => tokio::task::spawn_blocking(move || self.schedule(request))
                    .await
                    .map_err(|e| EngineError::Stopped(format!("scheduling failed: {e}")))?,
                None => self.schedule(request),
            }
        })
    }
}

impl LoadedModel {
    /// Token ids of `text`. A rendered chat already holds its special tokens, so
    /// `add_bos` is only for raw completions prompts.
    fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if add_bos && self.tokenizer.add_bos {
            ids.extend(self.tokenizer.bos);
        }
        let encoding = self.tokenizer.tokenizer.encode(text, false).expect("encoding a string cannot fail; this is a bug");
        ids.extend_from_slice(encoding.get_ids());
        ids
    }

    fn schedule(&self, request: GenerateRequest) -> Result<TokenStream, EngineError> {
        let grammar = match &request.constraint {
            Some(constraint) => Some(self.grammars()?.compile(constraint)?),
            None => None,
        };
        self.scheduler.schedule(request, grammar)
    }

    /// The model's compiler of response formats (its vocabulary's token trie, built once).
    fn grammars(&self) -> Result<&Grammars, EngineError> {
        let built = self.grammars.get_or_init(|| {
            let started = Instant::now();
            let grammars = Grammars::new(self.tokenizer.clone(), self.tokenizer.vocab_size()).map_err(|e| match e {
                grammar::GrammarError::Unavailable(m) | grammar::GrammarError::Unsupported(m) => m,
            });
            tracing::info!(model = %self.id, ms = started.elapsed().as_millis() as u64, "token trie for constrained decoding built");
            grammars
        });
        built.as_ref().map_err(|e| EngineError::Grammar(grammar::GrammarError::Unavailable(e.clone())))
    }
}

/// A configured model: loaded on first use (or at start, or by the admin route), kept
/// while in use, unloaded by the admin route or after `keep_alive` idle seconds.
struct ModelSlot {
    config: ModelConfig,
    /// Proxy mode: the upstreams that serve it (always ready; nothing loads).
    remote: Option<Arc<remote::RemoteModel>>,
    /// The model while it is loaded. Requests hold their own `Arc`, so an unload frees
    /// the memory only when the last request on it has finished.
    loaded: std::sync::RwLock<Option<Arc<LoadedModel>>>,
    /// One load at a time: requests that find the model unloaded wait for the same load.
    loading: tokio::sync::Mutex<()>,
    /// It loaded once (a deliberately unloaded default model is still ready: it reloads
    /// on the next request).
    ever_loaded: std::sync::atomic::AtomicBool,
    /// Unix ms of the last request that asked for it.
    last_used: std::sync::atomic::AtomicU64,
    created: u64,
}

impl ModelSlot {
    fn current(&self) -> Option<Arc<LoadedModel>> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Every configured model by id.
pub struct Registry {
    slots: HashMap<String, ModelSlot>,
    order: Vec<String>,
    default_id: String,
    limits: Limits,
    metrics: Arc<Metrics>,
}

/// What `/v1/models` lists.
pub struct ModelInfo {
    pub id: String,
    pub created: u64,
    pub loaded: bool,
    /// The model carries a chat template of its own (in the GGUF or the config): an
    /// instruct model. `None` until it is loaded.
    pub chat_template: Option<bool>,
    /// Idle seconds before it is unloaded; -1 never.
    pub keep_alive: i64,
    /// Proxy mode: how many upstreams serve it (0: the local engine).
    pub upstreams: usize,
}

impl Registry {
    /// The registry of the configured models; a proxied model starts its upstreams'
    /// health checks (so this runs inside the async runtime).
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Registry, EngineError> {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut slots = HashMap::new();
        for m in &config.models {
            let remote = match m.is_proxy() {
                true => Some(Arc::new(remote::RemoteModel::new(m, metrics.clone())?)),
                false => None,
            };
            let slot = ModelSlot {
                config: m.clone(),
                remote,
                loaded: std::sync::RwLock::new(None),
                loading: tokio::sync::Mutex::new(()),
                ever_loaded: false.into(),
                last_used: now_ms().into(),
                created,
            };
            slots.insert(m.id.clone(), slot);
        }
        Ok(Registry {
            slots,
            order: config.models.iter().map(|m| m.id.clone()).collect(),
            default_id: config.default_model().id.clone(),
            limits: config.limits.clone(),
            metrics,
        })
    }

    pub fn default_id(&self) -> &str {
        &self.default_id
    }

    pub fn list(&self) -> Vec<ModelInfo> {
        self.order.iter().filter_map(|id| self.info(id)).collect()
    }

    pub fn info(&self, id: &str) -> Option<ModelInfo> {
        self.slots.get(id).map(|s| {
            let loaded = s.current();
            ModelInfo {
                id: id.to_string(),
                created: s.created,
                loaded: loaded.is_some() || s.remote.is_some(),
                // An upstream applies its own template: served as a chat model.
                chat_template: if s.remote.is_some() { Some(true) } else { loaded.map(|m| m.own_template) },
                keep_alive: s.config.keep_alive,
                upstreams: s.config.upstreams.len(),
            }
        })
    }

    /// Whether the default model can serve (what `/ready` reports), or why not: loaded
    /// with its engine thread running, or unloaded on purpose after it loaded once (it
    /// reloads on demand); proxied, with an upstream that is not failing.
    pub fn readiness(&self) -> Result<(), String> {
        let id = &self.default_id;
        let Some(slot) = self.slots.get(id) else { return Err(format!("the default model `{id}` is not configured")) };
        let ready = match (&slot.remote, slot.current()) {
            (Some(remote), _) => {
                return remote.any_healthy().then_some(()).ok_or_else(|| format!("no upstream of the default model `{id}` is healthy"));
            }
            (None, Some(model)) => model.scheduler.is_alive(),
            (None, None) => slot.ever_loaded.load(std::sync::atomic::Ordering::Relaxed),
        };
        ready.then_some(()).ok_or_else(|| format!("the default model `{id}` is still loading"))
    }

    /// The models to load at start: the default one and those with `preload = true`.
    pub fn preload_ids(&self) -> Vec<String> {
        let local = |id: &&String| self.slots[*id].remote.is_none();
        self.order.iter().filter(local).filter(|id| **id == self.default_id || self.slots[*id].config.preload).cloned().collect()
    }

    /// The backend of model `id`, loading a local model first if needed (off the async
    /// executor): a request for an unloaded model waits for its load.
    pub async fn get(&self, id: &str) -> Result<Arc<dyn Backend>, EngineError> {
        let slot = self.slots.get(id).ok_or_else(|| EngineError::UnknownModel(id.to_string()))?;
        if let Some(remote) = &slot.remote {
            return Ok(remote.clone());
        }
        Ok(self.get_local(id, slot).await?)
    }

    async fn get_local(&self, id: &str, slot: &ModelSlot) -> Result<Arc<LoadedModel>, EngineError> {
        slot.last_used.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        if let Some(model) = slot.current() {
            return Ok(model);
        }
        let _loading = slot.loading.lock().await;
        if let Some(model) = slot.current() {
            return Ok(model);
        }
        let loaded = self.load_slot(id, slot).await?;
        *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(loaded.clone());
        slot.ever_loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        slot.last_used.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        Ok(loaded)
    }

    async fn load_slot(&self, id: &str, slot: &ModelSlot) -> Result<Arc<LoadedModel>, EngineError> {
        let config = slot.config.clone();
        let limits = self.limits.clone();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || load(&config, &limits, metrics))
            .await
            .map_err(|e| EngineError::Load { id: id.to_string(), message: e.to_string() })??;
        let secs = started.elapsed().as_secs_f64();
        self.metrics.model_load_seconds.with_label_values(&[id]).set(secs);
        tracing::info!(model = id, seconds = format!("{secs:.2}"), context = loaded.context_length, "model loaded");
        let loaded = Arc::new(loaded);
        // The vocabulary's trie for response formats takes seconds on a large
        // vocabulary (2.7 s for Gemma's 262k tokens on 2 cores): build it now, in
        // the background at the lowest priority, not on the first request.
        let warm = loaded.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("wisp-grammar-{id}"))
            .spawn(move || {
                lower_thread_priority();
                let _ = warm.grammars();
                // The build's temporaries (~75 MB on Gemma's vocabulary) are freed by now;
                // hand their pages back from a thread of normal priority: malloc_trim
                // locks every arena in turn, and a nice-19 thread holding one can be kept
                // off the CPU while request threads wait on it.
                runtime.spawn_blocking(release_free_memory);
            })
            .map_err(|e| EngineError::Load { id: id.to_string(), message: e.to_string() })?;
        Ok(loaded)
    }

    /// Unloads `id`: new requests load it again; requests running on it finish first, and
    /// its memory goes back to the OS when the last of them ends. `false` if it was not
    /// loaded.
    pub async fn unload(&self, id: &str) -> Result<bool, EngineError> {
        self.unload_when(id, |_| true).await
    }

    /// Unloads `id` if `still` holds for the loaded model, checked under the slot's lock
    /// (no request can take the model between the check and the unload).
    async fn unload_when(&self, id: &str, still: impl Fn(&Arc<LoadedModel>) -> bool) -> Result<bool, EngineError> {
        let slot = self.slots.get(id).ok_or_else(|| EngineError::UnknownModel(id.to_string()))?;
        let _loading = slot.loading.lock().await;
        let taken = {
            let mut loaded = slot.loaded.write().unwrap_or_else(|e| e.into_inner());
            match loaded.as_ref() {
                Some(model) if still(model) => loaded.take(),
                _ => None,
            }
        };
        let Some(model) = taken else { return Ok(false) };
        tracing::info!(model = id, in_flight = Arc::strong_count(&model) - 1, "model unloaded");
        release(model);
        Ok(true)
    }

    /// Unloads every model idle past its `keep_alive` with no request on it; run every
    /// second by [`Registry::spawn_keep_alive`].
    async fn unload_idle(&self) {
        for (id, slot) in &self.slots {
            let Ok(keep_alive) = u64::try_from(slot.config.keep_alive) else { continue };
            let idle =
                || now_ms().saturating_sub(slot.last_used.load(std::sync::atomic::Ordering::Relaxed)) >= keep_alive.saturating_mul(1000);
            // Idle, and only the slot holds it (no request, no background trie build):
            // checked again under the slot's lock.
            if idle() && slot.current().is_some() && matches!(self.unload_when(id, |m| Arc::strong_count(m) == 1 && idle()).await, Ok(true))
            {
                tracing::info!(model = %id, keep_alive, "unloaded: idle past keep_alive");
            }
        }
    }

    /// Starts the task that unloads idle models (when any has a `keep_alive`).
    pub fn spawn_keep_alive(self: &Arc<Self>) {
        if self.slots.values().all(|s| s.config.keep_alive < 0) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else { return };
                registry.unload_idle().await;
            }
        });
    }
}

/// Frees an unloaded model once no request holds it any more (requests running on it
/// finish first), off the async executor: its engine thread is stopped and joined, and
/// the freed memory handed back to the OS (glibc keeps freed heap otherwise).
fn release(model: Arc<LoadedModel>) {
    let spawned = std::thread::Builder::new().name("wisp-unload".into()).spawn(move || {
        let mut model = model;
        let model = loop {
            match Arc::try_unwrap(model) {
                Ok(model) => break model,
                Err(shared) => {
                    model = shared;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        };
        let id = model.id.clone();
        let LoadedModel { scheduler, .. } = model;
        scheduler.stop();
        release_free_memory();
        tracing::info!(model = %id, "model memory freed");
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "spawning the unload thread failed; the model stays in memory");
    }
}

/// Hands the heap memory that glibc keeps after frees back to the OS: a model's load-time
/// buffers, the KV caches of finished sequences. Without it the process's RSS stays at its
/// high-water mark. Called after a load, an unload, and when an engine goes idle.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes the calling thread yield the CPU to every normal one (nice 19): for background
/// work that must not slow requests.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; on Linux, PRIO_PROCESS with
    // who = 0 applies to the calling thread alone.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// Resolves where a model's GGUF lives.
fn model_path(config: &ModelConfig) -> Result<PathBuf, String> {
    if let Some(path) = &config.path {
        return Ok(path.clone());
    }
    let spec = config.hf.as_deref().unwrap_or_default();
    let (repo, file) = parse_hf(spec)?;
    hf_hub::Cache::from_env().model(repo.to_string()).get(file).ok_or_else(|| {
        format!(
            "`{spec}` is not in the local Hugging Face cache ({}); wisp never downloads at request time: \
             fetch it first with `huggingface-cli download {repo} {file}`",
            hf_hub::Cache::from_env().path().display()
        )
    })
}

/// Picks the candle device for a spec.
pub fn select_device(spec: DeviceSpec) -> candle_core::Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => Device::new_cuda(n),
        DeviceSpec::Metal => Device::new_metal(0),
        DeviceSpec::Auto => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0)
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0)
            } else {
                Ok(Device::Cpu)
            }
        }
    }
}

/// A model file read into memory, before any scheduler owns it.
pub struct ModelParts {
    pub family: Family,
    pub model: Model,
    pub tokenizer: GgufTokenizer,
    pub template: ChatTemplate,
    /// The template is the model's own (GGUF or config), not wisp's built-in fallback.
    pub own_template: bool,
    pub context_length: usize,
}

/// Reads the GGUF and builds tokenizer, template and model (also used by `wisp bench`).
/// The file is untrusted: every malformed part is an error naming what is wrong, and a
/// panic anywhere in reading it (a parser's bug) is an error too, never a dead process.
pub fn load_parts(config: &ModelConfig) -> Result<ModelParts, EngineError> {
    let fail = |message: String| EngineError::Load { id: config.id.clone(), message };
    let path = model_path(config).map_err(&fail)?;
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_parts(config, &path)));
    let parts = match read {
        Ok(parts) => parts.map_err(|e| fail(format!("{}: {e}", path.display())))?,
        Err(panic) => {
            let why = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            return Err(fail(format!("{}: the file is malformed ({})", path.display(), why.unwrap_or_default())));
        }
    };
    release_free_memory();
    Ok(parts)
}

fn read_parts(config: &ModelConfig, path: &std::path::Path) -> Result<ModelParts, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let header = model::gguf::read_header(&mut file)?;
    let content = &header.content;
    let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let family = Family::from_architecture(&arch)
        .ok_or_else(|| format!("architecture `{arch}` is not supported (supported: {})", Family::supported_list()))?;
    let hparams = Hparams::from_gguf(content, family).map_err(|e| model::error_message(&e))?;
    let context_length = match config.context_length {
        0 => hparams.context_length,
        n => n,
    };
    let tokenizer = GgufTokenizer::from_gguf(content).map_err(|e| e.to_string())?;
    let own = config.chat_template.clone().or_else(|| tokenizer.chat_template.clone());
    let own_template = own.is_some();
    let source = own.unwrap_or_else(|| template::builtin_template(family).to_string());
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.tokenizer.id_to_token(i)).unwrap_or_default();
    let template = ChatTemplate::new(source, token_text(tokenizer.bos), token_text(tokenizer.eos)).map_err(|e| e.to_string())?;
    let device = select_device(config.device_spec()).map_err(|e| format!("device `{}`: {e}", config.device))?;
    let model = Model::load(&header, &mut file, hparams, context_length, &device).map_err(|e| model::error_message(&e))?;
    Ok(ModelParts { family, model, tokenizer, template, own_template, context_length })
}

/// Loads a model and starts its scheduler.
fn load(config: &ModelConfig, limits: &Limits, metrics: Arc<Metrics>) -> Result<LoadedModel, EngineError> {
    let ModelParts { family, model, tokenizer, template, own_template, context_length } = load_parts(config)?;
    let tokenizer = Arc::new(tokenizer);
    let prefix_cache_bytes = limits.prefix_cache_bytes(model.kv_bytes_per_token(), model.max_state_bytes());
    tracing::info!(model = %config.id, prefix_cache_mb = prefix_cache_bytes >> 20, "prefix cache budget");
    let scheduler = Scheduler::start(
        scheduler::SchedulerConfig {
            model_id: config.id.clone(),
            max_queue: limits.max_queue,
            max_batch: limits.max_batch,
            prefill_chunk: config.prefill_chunk,
            prefix_cache_bytes,
        },
        model,
        tokenizer.clone(),
        metrics,
    );
    Ok(LoadedModel {
        id: config.id.clone(),
        family,
        tokenizer,
        template,
        own_template,
        context_length,
        scheduler,
        grammars: Default::default(),
    })
}
