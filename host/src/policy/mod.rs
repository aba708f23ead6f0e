//! The policy runtime: governance plugins (WebAssembly components of the `wisp:policy`
//! world, wit/policy.wit; components of older versions load through compat.rs) run in a
//! wasmtime sandbox around every request.
//!
//! Phases, each with its own error context:
//! 1. **load** — link the host imports and WASI (no preopens, no network), run `init` once
//!    with the plugin's config (a bad plugin or config is refused here, before it serves)
//!    and snapshot the initialised instance into a new component (preinit.rs), compile
//!    it (cached by content and config hash) and pre-instantiate it;
//! 2. **per request** — [`PolicyChain::start`] gives every plugin a fresh store and an
//!    instance of its snapshot (nothing leaks between requests or principals; `init` has
//!    already run), made ahead in the background when the previous request ended;
//!    [`PolicySession`] then runs `on-request` down the chain, `on-chunk` over the output
//!    and `on-finish` at the end.
//!
//! Every hook call (init included) is bounded whatever the guest does: its own execution
//! by `timeout_ms` of guest time (meter.rs; epoch interruption checks it every
//! [`limits::EPOCH_TICK`], yielding to tokio meanwhile), its waits in host calls by a
//! budget of their own, and the whole call by a wall-time cut-off; its memory by a cap;
//! what it returns by size caps and by the same rules a client's request keeps
//! (checks.rs). Plugins are linked with only the WASI interfaces a Rust guest's std needs
//! (no clocks, filesystem or sockets: nothing a guest can block on). A trap, timeout or
//! limit hit is a plugin failure: a `closed` plugin fails the request, an `open` one is
//! skipped for the rest of it and logged; either way that instance is never called again.
//! The host keeps serving.
//!
//! [`PolicySession`] owns the end of a request: every plugin that saw `on-request` hears
//! `on-finish` exactly once, however the request ends (a later plugin's denial, a
//! refusal by the engine, a hang-up: when the session is dropped unfinished it finishes
//! the plugins itself, in the background).
//!
//! Hot reload ([`PolicyManager`]) builds a whole new chain and swaps it atomically;
//! requests in flight finish on the chain they started with.

pub mod checks;
mod compat;
mod host;
pub mod kv;
pub mod limits;
pub mod manager;
mod meter;
mod preinit;
mod wasi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::telemetry::Metrics;
use checks::RequestRules;
use kv::KvBackend;
use limits::{EPOCH_TICK, MAX_INSTANCES, MAX_OUTPUT_BYTES, MAX_RESPONSE_BYTES, MAX_TABLES, PluginLimits};
use meter::{Meter, Metered};

pub use manager::PolicyManager;

pub mod bindings {
    //! Host bindings generated from wit/policy.wit (the current version).
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        imports: { default: async | trappable },
        exports: { default: async },
        additional_derives: [PartialEq],
    });
}

use bindings::wisp::policy::types;
pub use types::{Denial, Finish, Header, JsonSchema, Message, Request, ResponseFormat, Sampling, Tool, ToolChoice, Usage};

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
    /// It returned more text than [`MAX_OUTPUT_BYTES`] in one call, or than
    /// [`MAX_RESPONSE_BYTES`] over a response.
    Output,
    /// It rewrote the request into one that breaks the rules a client's request keeps.
    Invalid,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Output => "output",
            FailureKind::Invalid => "invalid",
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

/// A request as the chain decided it (one per request: not worth a box).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
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
    /// Guest and host time of the current hook call.
    meter: Arc<Meter>,
    /// Guest time one hook call may use.
    timeout: Duration,
    /// Log bytes this instance may still write (one instance serves one request).
    log_budget: usize,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Marks a hook stopped by its deadline, so it can be told from other traps.
#[derive(Debug)]
struct DeadlineExceeded(Duration);

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the hook ran past its deadline of {:?} of guest time", self.0)
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
    /// What a rewritten request must keep.
    rules: RequestRules,
    /// One permit per pool slot: a request waits here for its instances instead of
    /// failing when the pool is full.
    slots: Arc<Semaphore>,
}

impl PolicyEngine {
    /// Builds the engine (component model, epoch interruption) and starts the ticker.
    pub fn new(kv: Arc<dyn KvBackend>, metrics: Arc<Metrics>, rules: RequestRules) -> Result<Arc<PolicyEngine>, PolicyError> {
        let fail = |message: String| PolicyError::Load { plugin: "*".into(), phase: "start the engine", message };
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Pooling: instance slots are reserved once, so a per-request instance costs a
        // copy-on-write remap instead of fresh allocations.
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        // A component instance is several core instances (the guest and its shims), each
        // with its tables: slots for as many as one store may create, per component.
        pool.total_component_instances(limits::POOL_INSTANCES)
            .total_core_instances(limits::POOL_INSTANCES * MAX_INSTANCES as u32)
            .total_memories(limits::POOL_INSTANCES * limits::MAX_MEMORIES as u32)
            .total_tables(limits::POOL_INSTANCES * MAX_TABLES as u32)
            .max_memories_per_component(limits::MAX_MEMORIES as u32)
            // A store keeps its async stack while it lives: one per live instance.
            .total_stacks(limits::POOL_INSTANCES)
            .max_memory_size(limits::POOL_MAX_MEMORY_BYTES);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| fail(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker).map_err(|e| fail(e.to_string()))?;
        compat::add_to_linker(&mut linker).map_err(|e| fail(e.to_string()))?;
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
        let slots = Arc::new(Semaphore::new(limits::POOL_INSTANCES as usize));
        Ok(Arc::new(PolicyEngine { engine, linker, kv, compiled: Mutex::new(HashMap::new()), metrics, rules, slots }))
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
                .memories(limits::MAX_MEMORIES)
                .trap_on_grow_failure(true)
                .build(),
            kv: self.kv.clone(),
            plugin: plugin.clone(),
            started: Instant::now(),
            meter: Meter::new(),
            timeout: limits.timeout(),
            log_budget: limits::MAX_LOG_BYTES_PER_REQUEST,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        // Every tick the guest runs through: past its guest time the call traps; else, once
        // it has held the thread for a tick since it was last resumed, it yields to tokio
        // (so one resumed late, on a busy runtime, still gets a tick of progress).
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            if state.meter.guest_time() >= state.timeout {
                return Err(wasmtime::Error::new(DeadlineExceeded(state.timeout)));
            }
            match state.meter.running_for() >= EPOCH_TICK {
                true => Ok(UpdateDeadline::Yield(1)),
                false => Ok(UpdateDeadline::Continue(1)),
            }
        });
        store
    }

    /// Waits for `n` pool slots (see [`limits::POOL_INSTANCES`]).
    async fn slots(&self, n: usize) -> OwnedSemaphorePermit {
        let n = u32::try_from(n).unwrap_or(u32::MAX).min(limits::POOL_INSTANCES);
        self.slots.clone().acquire_many_owned(n).await.expect("the pool semaphore is never closed")
    }
}

/// One loaded plugin of a chain.
struct LoadedPlugin {
    name: Arc<str>,
    config: PluginConfig,
    config_json: String,
    pre: compat::PolicyPre,
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
    /// The `wisp:policy` version the component implements.
    pub contract: &'static str,
}

/// An ordered set of loaded plugins; immutable once built.
pub struct PolicyChain {
    engine: Arc<PolicyEngine>,
    plugins: Vec<LoadedPlugin>,
    /// Counts the chains built by this process (0 = the first): tells a reload happened.
    generation: u64,
    /// Fresh instances of every plugin, made in the background when a request ends, for
    /// the next one: instantiating the chain is then not on a request's path to its first
    /// token (nor competing with it for the CPU, as making it at the start would).
    spare: Mutex<Option<Spare>>,
    /// Told when a spare is put in place (a request waiting for pool slots takes it: the
    /// spare may hold the slots it waits for).
    spare_ready: tokio::sync::Notify,
    /// A task is making the spare.
    refilling: std::sync::atomic::AtomicBool,
}

/// One request's worth of instances, never called yet, and the pool slots they hold.
struct Spare {
    live: Vec<LivePlugin>,
    slots: OwnedSemaphorePermit,
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
            let config_json = serde_json::to_string(&config.config).map_err(|e| fail("encode its config", e.to_string()))?;
            let (component, sha256, preinitialized) = engine.prepare(&name, &config.wasm, &config_json, &config.limits).await?;
            let instance_pre = engine.linker.instantiate_pre(&component).map_err(|e| fail("link", format!("{e:#}")))?;
            let pre = compat::PolicyPre::new(instance_pre).map_err(|e| fail("link", e))?;
            let metrics = PluginMetrics::new(&engine.metrics, &name);
            let plugin = LoadedPlugin { name, config: config.clone(), config_json, pre, preinitialized, sha256, loaded_at: now, metrics };
            // A trial instance proves the plugin starts and accepts its config.
            let _slot = engine.slots(1).await;
            LivePlugin::start(&engine, &plugin, 0).await.map_err(|e| fail("initialise", e.to_string()))?;
            plugins.push(plugin);
        }
        let generation = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(PolicyChain {
            engine,
            plugins,
            generation,
            spare: Mutex::new(None),
            spare_ready: tokio::sync::Notify::new(),
            refilling: false.into(),
        })
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
                contract: p.pre.version(),
            })
            .collect()
    }

    /// Fresh instances of every plugin for one request: the spare made ahead if there is
    /// one, else made now (waiting for pool slots if the pool is full).
    pub async fn start(self: &Arc<Self>) -> Result<PolicySession, PolicyError> {
        let session = |live, slots| PolicySession {
            chain: self.clone(),
            live,
            usage: Usage { prompt_tokens: 0, completion_tokens: 0 },
            _slots: slots,
            finisher: false,
        };
        if self.plugins.is_empty() {
            return Ok(session(Vec::new(), None));
        }
        let take = || self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut spare = take();
        while spare.is_none() {
            // Slots for new instances, or a spare put in place meanwhile (it may hold the
            // last free slots).
            tokio::select! {
                slots = self.engine.slots(self.plugins.len()) => {
                    let live = self.instantiate().await?;
                    return Ok(session(live, Some(slots)));
                }
                () = self.spare_ready.notified() => spare = take(),
            }
        }
        let Spare { mut live, slots } = spare.expect("the loop ends with a spare");
        for plugin in &mut live {
            plugin.store.data_mut().started = Instant::now();
        }
        Ok(session(live, Some(slots)))
    }

    /// Instances of every plugin, made now (a plugin failing open is left out).
    async fn instantiate(&self) -> Result<Vec<LivePlugin>, PolicyError> {
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
        Ok(live)
    }

    /// Begins making the next spare (when a request ends), unless there is one, one is
    /// being made, or the pool has no free slots (a spare never makes a request wait). A
    /// plugin that fails to start leaves no spare: the request that finds none starts the
    /// chain itself and reports the failure.
    fn refill(self: &Arc<Self>) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.spare.lock().unwrap_or_else(|e| e.into_inner()).is_some() || self.refilling.swap(true, AcqRel) {
            return;
        }
        let n = u32::try_from(self.plugins.len()).unwrap_or(u32::MAX).min(limits::POOL_INSTANCES);
        let Ok(slots) = self.engine.slots.clone().try_acquire_many_owned(n) else {
            self.refilling.store(false, Release);
            return;
        };
        let chain = self.clone();
        runtime.spawn(async move {
            let mut live = Vec::with_capacity(chain.plugins.len());
            for (idx, plugin) in chain.plugins.iter().enumerate() {
                match LivePlugin::start(&chain.engine, plugin, idx).await {
                    Ok(p) => live.push(p),
                    Err(_) => break,
                }
            }
            if live.len() == chain.plugins.len() {
                *chain.spare.lock().unwrap_or_else(|e| e.into_inner()) = Some(Spare { live, slots });
                chain.spare_ready.notify_one();
            }
            chain.refilling.store(false, Release);
        });
    }

    /// Records a failure; `Some` if the plugin fails closed (the request must fail).
    fn failed(&self, idx: usize, hook: &'static str, failure: HookFailure) -> Option<PolicyError> {
        let plugin = &self.plugins[idx];
        self.engine.metrics.plugin_failures.with_label_values(&[&*plugin.name, failure.kind.as_str()]).inc();
        tracing::warn!(plugin = %plugin.name, hook, kind = failure.kind.as_str(), fail = ?plugin.config.fail, error = %failure.message, "plugin failed");
        match plugin.config.fail {
            FailMode::Open => None,
            FailMode::Closed => {
                Some(PolicyError::Failed { plugin: plugin.name.to_string(), hook, kind: failure.kind, message: failure.message })
            }
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

/// Runs one hook call within its limits: guest time is metered (the epoch callback ends
/// the call past `timeout_ms`), and past `wall` the call is cut off whatever it is doing.
async fn run_hook<T>(
    meter: &Arc<Meter>,
    wall: Duration,
    call: impl std::future::Future<Output = wasmtime::Result<T>> + Send,
) -> Result<T, HookFailure> {
    meter.reset();
    match tokio::time::timeout(wall, Metered::new(meter.clone(), call)).await {
        Ok(result) => result.map_err(HookFailure::from_error),
        Err(_) => Err(HookFailure { kind: FailureKind::Timeout, message: format!("the hook did not return within {wall:?} of wall time") }),
    }
}

/// One plugin instance serving one request.
struct LivePlugin {
    idx: usize,
    store: Store<PluginState>,
    instance: compat::Policy,
    meter: Arc<Meter>,
    wall: Duration,
    /// `on-request` reached this instance: it is owed exactly one `on-finish`.
    saw_request: bool,
    /// `on-finish` was called (whatever it returned).
    finished: bool,
    /// A hook call began and never returned (its caller was dropped): the instance is in
    /// an unknown state and is never called again.
    in_call: bool,
    /// Bytes this plugin emitted over the response so far.
    emitted: usize,
}

impl LivePlugin {
    async fn start(engine: &PolicyEngine, plugin: &LoadedPlugin, idx: usize) -> Result<LivePlugin, HookFailure> {
        let mut store = engine.store(&plugin.name, &plugin.config.limits);
        let meter = store.data().meter.clone();
        let wall = plugin.config.limits.wall_limit();
        let instance = run_hook(&meter, wall, plugin.pre.instantiate_async(&mut store)).await?;
        let mut live = LivePlugin { idx, store, instance, meter, wall, saw_request: false, finished: false, in_call: false, emitted: 0 };
        if plugin.preinitialized {
            return Ok(live);
        }
        match live.call(|p, s| Box::pin(p.call_init(s, &plugin.config_json))).await? {
            Ok(()) => Ok(live),
            Err(message) => Err(HookFailure { kind: FailureKind::Trap, message: format!("init refused its config: {message}") }),
        }
    }

    /// One hook call within the plugin's limits.
    async fn call<'a, T: 'a>(
        &'a mut self,
        hook: impl FnOnce(&'a compat::Policy, &'a mut Store<PluginState>) -> HookCall<'a, T>,
    ) -> Result<T, HookFailure> {
        self.in_call = true;
        let result = run_hook(&self.meter, self.wall, hook(&self.instance, &mut self.store)).await;
        self.in_call = false;
        result
    }

    fn owes_finish(&self) -> bool {
        self.saw_request && !self.finished && !self.in_call
    }
}

/// The future of one generated hook call.
type HookCall<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = wasmtime::Result<T>> + Send + 'a>>;

/// The plugins of one request, in chain order. Dropped before [`PolicySession::finish`],
/// it finishes the plugins it owes in the background (reason `error`, or `cancelled` once
/// output began; the usage last recorded).
pub struct PolicySession {
    chain: Arc<PolicyChain>,
    live: Vec<LivePlugin>,
    /// The usage reached so far, for an `on-finish` the session sends itself.
    usage: Usage,
    _slots: Option<OwnedSemaphorePermit>,
    /// This session is already the background finisher of another: dropping it (the task
    /// ended, or the runtime is shutting down and drops its tasks) finishes nothing more.
    finisher: bool,
}

impl PolicySession {
    /// Runs `on-request` down the chain: each plugin sees the request as the previous one
    /// left it; the first denial ends it.
    pub async fn on_request(&mut self, mut request: Request) -> Result<Decision, PolicyError> {
        let mut idx = 0;
        while idx < self.live.len() {
            let started = Instant::now();
            let plugin = &mut self.live[idx];
            plugin.saw_request = true;
            let loaded = &self.chain.plugins[plugin.idx];
            let span = tracing::debug_span!("plugin", name = %loaded.name, hook = "on_request");
            let result = plugin.call(|p, s| Box::pin(p.call_on_request(s, &request))).instrument(span).await;
            let result = result.and_then(|verdict| match verdict {
                types::Verdict::Rewrite(r) => checks::rewrite(&request, r, &self.chain.engine.rules)
                    .map(types::Verdict::Rewrite)
                    .map_err(|message| HookFailure { kind: FailureKind::Invalid, message }),
                other => Ok(other),
            });
            loaded.metrics.on_request.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(types::Verdict::Allow) => loaded.metrics.allow.inc(),
                Ok(types::Verdict::Rewrite(r)) => {
                    loaded.metrics.rewrite.inc();
                    request = r;
                }
                Ok(types::Verdict::Deny(d)) => {
                    loaded.metrics.deny.inc();
                    return Ok(Decision::Deny(checks::denial(d)));
                }
                Err(failure) => {
                    self.drop_or_fail(idx, "on_request", failure)?;
                    continue;
                }
            }
            idx += 1;
        }
        Ok(Decision::Allow(request))
    }

    /// Runs one piece of output through every plugin in order. Returns the text to send
    /// and whether a plugin asked to stop.
    pub async fn on_chunk(&mut self, text: String) -> Result<(String, bool), PolicyError> {
        self.pipe(0, text).await
    }

    /// Records how far the request got, for an `on-finish` the session has to send itself.
    pub fn record_usage(&mut self, usage: Usage) {
        self.usage = usage;
    }

    /// Ends the output: each plugin that saw `on-request` hears `on-finish` (once: a second
    /// call finishes nobody), and its held-back text goes on through the plugins after it.
    pub async fn finish(&mut self, finish: Finish) -> Result<String, PolicyError> {
        self.usage = finish.usage;
        let mut out = String::new();
        let mut idx = 0;
        while idx < self.live.len() {
            let plugin = &mut self.live[idx];
            if !plugin.owes_finish() {
                idx += 1;
                continue;
            }
            plugin.finished = true;
            let span = tracing::debug_span!("plugin", name = %self.chain.plugins[plugin.idx].name, hook = "on_finish");
            let result = plugin.call(|p, s| Box::pin(p.call_on_finish(s, &finish))).instrument(span).await;
            match result.and_then(|t| plugin.check_emit(t)) {
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
            let span = tracing::debug_span!("plugin", name = %self.chain.plugins[plugin.idx].name, hook = "on_chunk");
            let result = plugin.call(|p, s| Box::pin(p.call_on_chunk(s, &text))).instrument(span).await;
            self.chain.plugins[plugin.idx].metrics.on_chunk.observe(started.elapsed().as_secs_f64());
            match result.and_then(|r| Ok((plugin.check_emit(r.emit)?, r.stop))) {
                Ok((emit, stopped)) => {
                    text = emit;
                    stop |= stopped;
                    idx += 1;
                }
                // An open plugin that fails is skipped: the text passes on unchanged.
                Err(failure) => self.drop_or_fail(idx, "on_chunk", failure)?,
            }
        }
        Ok((text, stop))
    }

    /// A failed plugin leaves the request (it is never called again, not even `on-finish`);
    /// a closed one fails the request with it.
    fn drop_or_fail(&mut self, idx: usize, hook: &'static str, failure: HookFailure) -> Result<(), PolicyError> {
        let plugin = self.live.remove(idx);
        match self.chain.failed(plugin.idx, hook, failure) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

impl LivePlugin {
    /// Text a hook returned, within the per-call cap and the per-response total.
    fn check_emit(&mut self, text: String) -> Result<String, HookFailure> {
        if text.len() > MAX_OUTPUT_BYTES {
            return Err(HookFailure::output(text.len()));
        }
        self.emitted += text.len();
        if self.emitted > MAX_RESPONSE_BYTES {
            return Err(HookFailure {
                kind: FailureKind::Output,
                message: format!("emitted {} bytes over one response, over the limit of {MAX_RESPONSE_BYTES}", self.emitted),
            });
        }
        Ok(text)
    }
}

impl Drop for PolicySession {
    fn drop(&mut self) {
        if self.finisher {
            return;
        }
        if !self.chain.plugins.is_empty() {
            self.chain.refill();
        }
        let owed: Vec<LivePlugin> = std::mem::take(&mut self.live).into_iter().filter(LivePlugin::owes_finish).collect();
        if owed.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let reason = if self.usage.completion_tokens > 0 { "cancelled" } else { "error" };
        let finish = Finish { reason: reason.into(), usage: self.usage };
        let mut rest =
            PolicySession { chain: self.chain.clone(), live: owed, usage: self.usage, _slots: self._slots.take(), finisher: true };
        runtime.spawn(async move {
            if let Err(e) = rest.finish(finish).await {
                tracing::warn!(error = %e, "on-finish for an unfinished request failed");
            }
        });
    }
}
