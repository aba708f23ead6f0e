//! Pre-initialisation: a plugin's `init(config)` runs once at load and the initialised
//! instance is snapshotted into a new component with wasmtime-wizer, so each request's
//! fresh instance starts with the plugin's state ready (compiled regexes, parsed keys)
//! instead of running `init` again. Measured on the default chain: per-request cost from
//! ~1.6 ms to a fraction of that (`wisp plugin bench`; shared/notes).
//!
//! The snapshot reads the instance's memories and globals through the accessor functions
//! wizer's instrumentation adds; [`Access`] calls them, as wasmtime-wizer's own
//! `WasmtimeWizerComponent` does (wasmtime-wizer 48, src/component/wasmtime.rs), without
//! that feature's extra wasmtime features (cache, gc, threads).

use wasmtime::Store;
use wasmtime::component::{Component, Instance, Lift, WasmList};
use wasmtime_wizer::ComponentInstanceState;
use wasmtime_wizer::Wizer;

use super::limits::PluginLimits;
use super::{PluginState, PolicyEngine, run_hook};

/// Runs `init(config_json)` on an instrumented instance and returns the snapshot component.
/// An `Err` is a message: the caller falls back to calling `init` per request, except when
/// `init` itself refused the config (`Refused`).
pub async fn preinitialize(
    engine: &PolicyEngine,
    plugin: &std::sync::Arc<str>,
    bytes: &[u8],
    config_json: &str,
    limits: &PluginLimits,
) -> Result<Vec<u8>, Preinit> {
    let mut wizer = Wizer::new();
    wizer.init_func("init").keep_init_func(true);
    let (cx, instrumented) = wizer.instrument_component(bytes).map_err(|e| Preinit::Unsupported(format!("{e:#}")))?;
    let component = Component::new(&engine.engine, &instrumented).map_err(|e| Preinit::Unsupported(format!("{e:#}")))?;
    let _slot = engine.slots(1).await;
    let mut store = engine.store(plugin, limits);
    let meter = store.data().meter.clone();
    let wall = limits.wall_limit();
    let instance = run_hook(&meter, wall, engine.linker.instantiate_async(&mut store, &component))
        .await
        .map_err(|e| Preinit::Unsupported(e.to_string()))?;
    // `init` has one signature in every version of the contract.
    let init = instance
        .get_typed_func::<(&str,), (Result<(), String>,)>(&mut store, "init")
        .map_err(|e| Preinit::Unsupported(format!("{e:#}")))?;
    // `init` runs within the same limits as every hook: one that loops or blocks cannot
    // hang start-up or wedge a reload.
    match run_hook(&meter, wall, async { Ok(init.call_async(&mut store, (config_json,)).await?.0) }).await {
        Ok(Ok(())) => {}
        Ok(Err(message)) => return Err(Preinit::Refused(message)),
        Err(failure) => return Err(Preinit::Refused(format!("init failed: {failure}"))),
    }
    let mut access = Access { store: &mut store, instance };
    wizer.snapshot_component(&cx, &mut access).await.map_err(|e| Preinit::Unsupported(format!("{e:#}")))
}

/// Why a plugin was not pre-initialised.
pub enum Preinit {
    /// `init` refused the config or trapped: the plugin cannot load.
    Refused(String),
    /// The snapshot could not be made; `init` will run per request instead.
    Unsupported(String),
}

struct Access<'a> {
    store: &'a mut Store<PluginState>,
    instance: Instance,
}

impl Access<'_> {
    async fn call<R: Lift + Send + Sync + 'static, R2>(
        &mut self,
        instance: &str,
        func: &str,
        use_ret: impl FnOnce(&mut Store<PluginState>, R) -> R2,
    ) -> R2 {
        // The accessors are added by wizer's instrumentation; their absence is a bug there.
        let (_, exported) = self.instance.get_export(&mut *self.store, None, instance).expect("wizer accessor instance");
        let (_, func) = self.instance.get_export(&mut *self.store, Some(&exported), func).expect("wizer accessor");
        let func = self.instance.get_typed_func::<(), (R,)>(&mut *self.store, func).expect("wizer accessor type");
        let ret = func.call_async(&mut *self.store, ()).await.expect("wizer accessors do not trap").0;
        use_ret(&mut *self.store, ret)
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        self.call(instance, func, |store, list: WasmList<u8>| contents(list.as_le_slice(&store))).await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, r: f32| r.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, r: f64| r.to_bits()).await
    }
}
