//! The policy runtime: governance plugins (WebAssembly components of the `wisp:policy`
//! world, wit/policy.wit) run in a wasmtime sandbox around every request.
//!
//! Phases, each with its own error context:
//! 1. **load** — link the host imports and WASI (no preopens, no network), run `init` once
//!    with the plugin's config (a bad plugin or config is refused here, before it serves)
//!    and snapshot the initialised instance into a new component (preinit.rs), compile
//!    it (cached by content and config hash) and pre-instantiate it;
//! 2. **per request** — [`PolicyChain::start`] gives every plugin a fresh store and an
//!    instance of its snapshot (nothing leaks between requests or principals; `init` has
//!    already run);
//!    [`PolicySession`] then runs `on-request` down the chain, `on-chunk` over the output
//!    and `on-finish` at the end.
//!
//! Every hook call has a wall-time deadline (epoch interruption, checked every
//! [`limits::EPOCH_TICK`], yielding to tokio meanwhile) and a memory cap. A trap, timeout
//! or limit hit is a plugin failure: a `closed` plugin fails the request, an `open` one is
//! skipped for the rest of it and logged. The host keeps serving either way.
//!
//! Hot reload ([`PolicyManager`]) builds a whole new chain and swaps it atomically;
//! requests in flight finish on the chain they started with.

mod host;
pub mod kv;
pub mod limits;
pub mod manager;
mod preinit;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::telemetry::Metrics;
use kv::KvBackend;
use limits::{EPOCH_TICK, MAX_INSTANCES, MAX_OUTPUT_BYTES, MAX_TABLES, PluginLimits};

pub use manager::PolicyManager;

pub mod bindings {
    //! Host bindings generated from wit/policy.wit.
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use bindings::wisp::policy::types;
pub use types::{Denial, Finish, Header, Message, Request, Sampling, Usage};

/// What a plugin does when it fails.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The request fails with an error (the safe default for governance).
    #[default]
    Closed,
    /// The plugin is skipped for the rest of the request; the failure is logged.
    Open,
}

/// One `[[plugins]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// A name for logs, metrics and the kv namespace.
    pub name: String,
    /// The component file (built for wasm32-wasip2).
    pub wasm: PathBuf,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// `closed` (default) or `open`.
    #[serde(default)]
    pub fail: FailMode,
    #[serde(default)]
    pub limits: PluginLimits,
}

/// Why a plugin call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Trap,
    Timeout,
    Memory,
    /// It returned more text than [`MAX_OUTPUT_BYTES`].
    Output,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Output => "output",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A plugin could not be loaded: names the plugin and the phase.
    #[error("plugin `{plugin}` failed to {phase}: {message}")]
    Load { plugin: String, phase: &'static str, message: String },
    /// A plugin failed while serving a request (and fails closed).
    #[error("the policy plugin `{plugin}` failed in {hook} ({}): {message}", kind.as_str())]
    Failed { plugin: String, hook: &'static str, kind: FailureKind, message: String },
}

/// A request as the chain decided it.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Go on, with this (possibly rewritten) request.
    Allow(Request),
    Deny(Denial),
}

/// Store data of one plugin instance.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    kv: Arc<dyn KvBackend>,
    plugin: Arc<str>,
    started: Instant,
    /// When the current hook call must end.
    deadline: Instant,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Marks a hook stopped by its deadline, so it can be told from other traps.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the hook ran past its deadline")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// The wasmtime engine with wisp's settings, its epoch ticker, and the compile cache.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<PluginState>,
    kv: Arc<dyn KvBackend>,
    /// Compiled components by sha256 of their bytes (and config, for snapshots): a reload
    /// that keeps a plugin's file and config neither re-initialises nor recompiles it.
    compiled: Mutex<HashMap<[u8; 32], Component>>,
    metrics: Arc<Metrics>,
}

impl PolicyEngine {
    /// Builds the engine (component model, epoch interruption) and starts the ticker.
    pub fn new(kv: Arc<dyn KvBackend>, metrics: Arc<Metrics>) -> Result<Arc<PolicyEngine>, PolicyError> {
        let fail = |message: String| PolicyError::Load { plugin: "*".into(), phase: "start the engine", message };
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Pooling: instance slots are reserved once, so a per-request instance costs a
        // copy-on-write remap instead of fresh allocations.
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(limits::POOL_INSTANCES)
            .total_core_instances(limits::POOL_INSTANCES)
            .total_memories(limits::POOL_INSTANCES)
            .total_tables(limits::POOL_INSTANCES)
            .max_memory_size(limits::POOL_MAX_MEMORY_BYTES);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| fail(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| fail(e.to_string()))?;
        bindings::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| fail(e.to_string()))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wisp-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .expect("spawning the epoch ticker failed; this is a bug");
        Ok(Arc::new(PolicyEngine { engine, linker, kv, compiled: Mutex::new(HashMap::new()), metrics }))
    }

    /// Reads, pre-initialises (or, failing that, plainly compiles) one plugin. Returns the
    /// component, the sha256 of the file, and whether `init` is already done.
    async fn prepare(
        &self,
        name: &Arc<str>,
        path: &Path,
        config_json: &str,
        limits: &PluginLimits,
    ) -> Result<(Component, String, bool), PolicyError> {
        let fail = |phase, message: String| PolicyError::Load { plugin: name.to_string(), phase, message };
        let bytes = std::fs::read(path).map_err(|e| fail("read its wasm", format!("{}: {e}", path.display())))?;
        let file_hash: [u8; 32] = Sha256::digest(&bytes).into();
        let hex: String = file_hash.iter().map(|b| format!("{b:02x}")).collect();
        let snapshot_key: [u8; 32] = Sha256::new().chain_update(file_hash).chain_update(config_json).finalize().into();
        if let Some(component) = self.cached(&snapshot_key) {
            return Ok((component, hex, true));
        }
        match preinit::preinitialize(self, name, &bytes, config_json, limits).await {
            Ok(snapshot) => {
                let component = Component::new(&self.engine, &snapshot).map_err(|e| fail("compile", format!("{e:#}")))?;
                self.compiled.lock().unwrap_or_else(|e| e.into_inner()).insert(snapshot_key, component.clone());
                Ok((component, hex, true))
            }
            Err(preinit::Preinit::Refused(message)) => Err(fail("initialise", message)),
            Err(preinit::Preinit::Unsupported(message)) => {
                tracing::warn!(plugin = %name, error = %message, "no snapshot: init will run per request");
                let component = match self.cached(&file_hash) {
                    Some(c) => c,
                    None => Component::new(&self.engine, &bytes).map_err(|e| fail("compile", format!("{e:#}")))?,
                };
                self.compiled.lock().unwrap_or_else(|e| e.into_inner()).insert(file_hash, component.clone());
                Ok((component, hex, false))
            }
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Component> {
        self.compiled.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    fn store(&self, plugin: &Arc<str>, limits: &PluginLimits) -> Store<PluginState> {
        let state = PluginState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes())
                .tables(MAX_TABLES)
                .instances(MAX_INSTANCES)
                .trap_on_grow_failure(true)
                .build(),
            kv: self.kv.clone(),
            plugin: plugin.clone(),
            started: Instant::now(),
            deadline: Instant::now(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        // Every tick: past the deadline the call traps, else it yields to tokio and goes on.
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                return Err(wasmtime::Error::new(DeadlineExceeded));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }
}

/// One loaded plugin of a chain.
struct LoadedPlugin {
    name: Arc<str>,
    config: PluginConfig,
    config_json: String,
    pre: bindings::PolicyPre<PluginState>,
    /// The component is a snapshot taken after `init`: requests skip it.
    preinitialized: bool,
    sha256: String,
    loaded_at: u64,
    metrics: PluginMetrics,
}

/// One plugin's metric handles, looked up at load (the hooks run per chunk).
struct PluginMetrics {
    on_request: prometheus::Histogram,
    on_chunk: prometheus::Histogram,
    allow: prometheus::IntCounter,
    deny: prometheus::IntCounter,
    rewrite: prometheus::IntCounter,
}

impl PluginMetrics {
    fn new(metrics: &Metrics, plugin: &str) -> PluginMetrics {
        let verdict = |v: &str| metrics.plugin_verdicts.with_label_values(&[plugin, v]);
        PluginMetrics {
            on_request: metrics.plugin_hook_seconds.with_label_values(&[plugin, "on_request"]),
            on_chunk: metrics.plugin_hook_seconds.with_label_values(&[plugin, "on_chunk"]),
            allow: verdict("allow"),
            deny: verdict("deny"),
            rewrite: verdict("rewrite"),
        }
    }
}

/// What `GET /admin/plugins` shows of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub wasm: String,
    pub sha256: String,
    pub fail: FailMode,
    pub loaded_at: u64,
    pub limits: PluginLimits,
    /// Whether requests start from a snapshot taken after `init`.
    pub preinitialized: bool,
}

/// An ordered set of loaded plugins; immutable once built.
pub struct PolicyChain {
    engine: Arc<PolicyEngine>,
    plugins: Vec<LoadedPlugin>,
    /// Counts the chains built by this process (0 = the first): tells a reload happened.
    generation: u64,
}

/// The generation the next chain gets.
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl PolicyChain {
    /// Loads every plugin (compile, pre-instantiate, a trial `init`); the first failure
    /// refuses the whole chain.
    pub async fn load(engine: Arc<PolicyEngine>, configs: &[PluginConfig]) -> Result<PolicyChain, PolicyError> {
        let mut plugins = Vec::with_capacity(configs.len());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        for config in configs {
            let name: Arc<str> = config.name.as_str().into();
            let fail = |phase, message: String| PolicyError::Load { plugin: config.name.clone(), phase, message };
            let config_json =
                serde_json::to_string(&config.config).map_err(|e| fail("encode its config", e.to_string()))?;
            let (component, sha256, preinitialized) =
                engine.prepare(&name, &config.wasm, &config_json, &config.limits).await?;
            let instance_pre = engine.linker.instantiate_pre(&component).map_err(|e| fail("link", format!("{e:#}")))?;
            let pre = bindings::PolicyPre::new(instance_pre).map_err(|e| fail("link", format!("{e:#}")))?;
            let metrics = PluginMetrics::new(&engine.metrics, &name);
            let plugin = LoadedPlugin {
                name,
                config: config.clone(),
                config_json,
                pre,
                preinitialized,
                sha256,
                loaded_at: now,
                metrics,
            };
            // A trial instance proves the plugin starts and accepts its config.
            LivePlugin::start(&engine, &plugin, 0).await.map_err(|e| fail("initialise", e.to_string()))?;
            plugins.push(plugin);
        }
        let generation = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(PolicyChain { engine, plugins, generation })
    }

    /// Which chain this is, in load order within the process.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A chain with no plugins (everything allowed, output untouched).
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    pub fn info(&self) -> Vec<PluginInfo> {
        self.plugins
            .iter()
            .map(|p| PluginInfo {
                name: p.name.to_string(),
                wasm: p.config.wasm.display().to_string(),
                sha256: p.sha256.clone(),
                fail: p.config.fail,
                loaded_at: p.loaded_at,
                limits: p.config.limits.clone(),
                preinitialized: p.preinitialized,
            })
            .collect()
    }

    /// Fresh instances of every plugin for one request.
    pub async fn start(self: &Arc<Self>) -> Result<PolicySession, PolicyError> {
        let mut live = Vec::with_capacity(self.plugins.len());
        for (idx, plugin) in self.plugins.iter().enumerate() {
            match LivePlugin::start(&self.engine, plugin, idx).await {
                Ok(p) => live.push(p),
                Err(failure) => {
                    if let Some(err) = self.failed(idx, "init", failure) {
                        return Err(err);
                    }
                }
            }
        }
        Ok(PolicySession { chain: self.clone(), live })
    }

    /// Records a failure; `Some` if the plugin fails closed (the request must fail).
    fn failed(&self, idx: usize, hook: &'static str, failure: HookFailure) -> Option<PolicyError> {
        let plugin = &self.plugins[idx];
        self.engine.metrics.plugin_failures.with_label_values(&[&*plugin.name, failure.kind.as_str()]).inc();
        tracing::warn!(plugin = %plugin.name, hook, kind = failure.kind.as_str(), fail = ?plugin.config.fail, error = %failure.message, "plugin failed");
        match plugin.config.fail {
            FailMode::Open => None,
            FailMode::Closed => Some(PolicyError::Failed {
                plugin: plugin.name.to_string(),
                hook,
                kind: failure.kind,
                message: failure.message,
            }),
        }
    }
}

/// A failed hook call.
#[derive(Debug)]
struct HookFailure {
    kind: FailureKind,
    message: String,
}

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.as_str())
    }
}

impl HookFailure {
    fn from_error(e: wasmtime::Error) -> HookFailure {
        let kind = if e.downcast_ref::<DeadlineExceeded>().is_some() {
            FailureKind::Timeout
        } else if format!("{e:#}").contains("growing memory") {
            FailureKind::Memory
        } else {
            FailureKind::Trap
        };
        HookFailure { kind, message: format!("{e:#}") }
    }

    fn output(bytes: usize) -> HookFailure {
        HookFailure { kind: FailureKind::Output, message: format!("returned {bytes} bytes, over the limit of {MAX_OUTPUT_BYTES}") }
    }
}

/// One plugin instance serving one request.
struct LivePlugin {
    idx: usize,
    store: Store<PluginState>,
    instance: bindings::Policy,
    timeout: std::time::Duration,
}

impl LivePlugin {
    async fn start(engine: &PolicyEngine, plugin: &LoadedPlugin, idx: usize) -> Result<LivePlugin, HookFailure> {
        let mut store = engine.store(&plugin.name, &plugin.config.limits);
        let timeout = plugin.config.limits.timeout();
        store.data_mut().deadline = Instant::now() + timeout;
        let instance = plugin.pre.instantiate_async(&mut store).await.map_err(HookFailure::from_error)?;
        if plugin.preinitialized {
            return Ok(LivePlugin { idx, store, instance, timeout });
        }
        store.data_mut().deadline = Instant::now() + timeout;
        match instance.call_init(&mut store, &plugin.config_json).await.map_err(HookFailure::from_error)? {
            Ok(()) => Ok(LivePlugin { idx, store, instance, timeout }),
            Err(message) => Err(HookFailure { kind: FailureKind::Trap, message: format!("init refused its config: {message}") }),
        }
    }

    fn arm(&mut self) {
        self.store.data_mut().deadline = Instant::now() + self.timeout;
    }
}

/// The plugins of one request, in chain order.
pub struct PolicySession {
    chain: Arc<PolicyChain>,
    live: Vec<LivePlugin>,
}

impl PolicySession {
    /// Runs `on-request` down the chain: each plugin sees the request as the previous one
    /// left it; the first denial ends it.
    pub async fn on_request(&mut self, mut request: Request) -> Result<Decision, PolicyError> {
        let mut idx = 0;
        while idx < self.live.len() {
            let started = Instant::now();
            let plugin = &mut self.live[idx];
            plugin.arm();
            let span = tracing::debug_span!("plugin", name = %self.chain.plugins[plugin.idx].name, hook = "on_request");
            let result = plugin.instance.call_on_request(&mut plugin.store, &request).instrument(span).await.map_err(HookFailure::from_error);
            let result = result.and_then(|v| match &v {
                types::Verdict::Rewrite(r) if request_bytes(r) > MAX_OUTPUT_BYTES => Err(HookFailure::output(request_bytes(r))),
                _ => Ok(v),
            });
            let metrics = &self.chain.plugins[plugin.idx].metrics;
            metrics.on_request.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(verdict) => {
                    match &verdict {
                        types::Verdict::Allow => metrics.allow.inc(),
                        types::Verdict::Deny(_) => metrics.deny.inc(),
                        types::Verdict::Rewrite(_) => metrics.rewrite.inc(),
                    }
                    match verdict {
                        types::Verdict::Allow => {}
                        types::Verdict::Rewrite(r) => request = r,
                        types::Verdict::Deny(d) => return Ok(Decision::Deny(d)),
                    }
                    idx += 1;
                }
                Err(failure) => self.drop_or_fail(idx, "on_request", failure)?,
            }
        }
        Ok(Decision::Allow(request))
    }

    /// Runs one piece of output through every plugin in order. Returns the text to send
    /// and whether a plugin asked to stop.
    pub async fn on_chunk(&mut self, text: String) -> Result<(String, bool), PolicyError> {
        self.pipe(0, text).await
    }

    /// Ends the output: each plugin's held-back text goes on through the plugins after it.
    pub async fn finish(&mut self, finish: Finish) -> Result<String, PolicyError> {
        let mut out = String::new();
        let mut idx = 0;
        while idx < self.live.len() {
            let plugin = &mut self.live[idx];
            plugin.arm();
            let span = tracing::debug_span!("plugin", name = %self.chain.plugins[plugin.idx].name, hook = "on_finish");
            let result = plugin.instance.call_on_finish(&mut plugin.store, &finish).instrument(span).await.map_err(HookFailure::from_error);
            match result.and_then(|t| if t.len() > MAX_OUTPUT_BYTES { Err(HookFailure::output(t.len())) } else { Ok(t) }) {
                Ok(held) => {
                    if !held.is_empty() {
                        let (text, _) = self.pipe(idx + 1, held).await?;
                        out.push_str(&text);
                    }
                    idx += 1;
                }
                Err(failure) => self.drop_or_fail(idx, "on_finish", failure)?,
            }
        }
        Ok(out)
    }

    /// `on-chunk` through the plugins from position `from`.
    async fn pipe(&mut self, from: usize, mut text: String) -> Result<(String, bool), PolicyError> {
        let mut stop = false;
        let mut idx = from;
        while idx < self.live.len() {
            if text.is_empty() {
                break;
            }
            let started = Instant::now();
            let plugin = &mut self.live[idx];
            plugin.arm();
            let span = tracing::debug_span!("plugin", name = %self.chain.plugins[plugin.idx].name, hook = "on_chunk");
            let result = plugin.instance.call_on_chunk(&mut plugin.store, &text).instrument(span).await.map_err(HookFailure::from_error);
            self.chain.plugins[plugin.idx].metrics.on_chunk.observe(started.elapsed().as_secs_f64());
            match result.and_then(|r| if r.emit.len() > MAX_OUTPUT_BYTES { Err(HookFailure::output(r.emit.len())) } else { Ok(r) }) {
                Ok(r) => {
                    text = r.emit;
                    stop |= r.stop;
                    idx += 1;
                }
                // An open plugin that fails is skipped: the text passes on unchanged.
                Err(failure) => self.drop_or_fail(idx, "on_chunk", failure)?,
            }
        }
        Ok((text, stop))
    }

    /// Fails the request for a closed plugin; drops an open one from this request.
    fn drop_or_fail(&mut self, idx: usize, hook: &'static str, failure: HookFailure) -> Result<(), PolicyError> {
        let chain_idx = self.live[idx].idx;
        if let Some(err) = self.chain.failed(chain_idx, hook, failure) {
            return Err(err);
        }
        self.live.remove(idx);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

fn request_bytes(r: &Request) -> usize {
    r.messages.iter().map(|m| m.content.len() + m.role.len()).sum::<usize>() + r.model.len()
}
