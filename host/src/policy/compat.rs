//! The versions of the plugin contract a component may implement, behind one interface.
//!
//! `wisp:policy@0.2.0` (wit/policy.wit) is current. Components built for 0.1.0
//! (wit/compat/policy-0.1.0.wit) keep loading unchanged: the linker serves both versions'
//! imports, a component is typed against the current world first and the old one second,
//! and an old component sees requests without the fields 0.2.0 added (tools, tool choice,
//! response format) while its rewrites leave those fields as they were. The rest of the
//! runtime speaks only the current types.

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::bindings::wisp::policy::types;
use super::{PluginState, bindings};

pub mod v0_1 {
    //! Host bindings generated from wit/compat/policy-0.1.0.wit.
    wasmtime::component::bindgen!({
        path: "../wit/compat/policy-0.1.0.wit",
        world: "policy",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use v0_1::wisp::policy::types as old;

/// Adds every version's host imports to the linker.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    bindings::Policy::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    v0_1::Policy::add_to_linker::<_, HasSelf<_>>(linker, |s| s)
}

/// A plugin component, pre-instantiated against the version it implements.
pub enum PolicyPre {
    Current(bindings::PolicyPre<PluginState>),
    V0_1(v0_1::PolicyPre<PluginState>),
}

/// One instance of a plugin.
pub enum Policy {
    Current(bindings::Policy),
    V0_1(v0_1::Policy),
}

impl PolicyPre {
    /// Types the component against the current world, then the old one; the error names
    /// what the current world found wrong (an old component that fits neither fails both).
    pub fn new(pre: InstancePre<PluginState>) -> Result<PolicyPre, String> {
        match bindings::PolicyPre::new(pre.clone()) {
            Ok(current) => Ok(PolicyPre::Current(current)),
            Err(current) => match v0_1::PolicyPre::new(pre) {
                Ok(old) => Ok(PolicyPre::V0_1(old)),
                Err(_) => Err(format!("{current:#} (it implements neither wisp:policy@0.2.0 nor 0.1.0)")),
            },
        }
    }

    /// The contract version, for `GET /admin/plugins`.
    pub fn version(&self) -> &'static str {
        match self {
            PolicyPre::Current(_) => "0.2.0",
            PolicyPre::V0_1(_) => "0.1.0",
        }
    }

    pub async fn instantiate_async(&self, store: &mut Store<PluginState>) -> wasmtime::Result<Policy> {
        Ok(match self {
            PolicyPre::Current(pre) => Policy::Current(pre.instantiate_async(store).await?),
            PolicyPre::V0_1(pre) => Policy::V0_1(pre.instantiate_async(store).await?),
        })
    }
}

impl Policy {
    pub async fn call_init(&self, store: &mut Store<PluginState>, config: &str) -> wasmtime::Result<Result<(), String>> {
        match self {
            Policy::Current(p) => p.call_init(store, config).await,
            Policy::V0_1(p) => p.call_init(store, config).await,
        }
    }

    pub async fn call_on_request(&self, store: &mut Store<PluginState>, request: &types::Request) -> wasmtime::Result<types::Verdict> {
        match self {
            Policy::Current(p) => p.call_on_request(store, request).await,
            Policy::V0_1(p) => Ok(match p.call_on_request(store, &to_old(request)).await? {
                old::Verdict::Allow => types::Verdict::Allow,
                old::Verdict::Deny(d) => types::Verdict::Deny(types::Denial { status: d.status, code: d.code, message: d.message }),
                old::Verdict::Rewrite(r) => types::Verdict::Rewrite(from_old(request, r)),
            }),
        }
    }

    pub async fn call_on_chunk(&self, store: &mut Store<PluginState>, text: &str) -> wasmtime::Result<types::ChunkResult> {
        match self {
            Policy::Current(p) => p.call_on_chunk(store, text).await,
            Policy::V0_1(p) => {
                let r = p.call_on_chunk(store, text).await?;
                Ok(types::ChunkResult { emit: r.emit, stop: r.stop })
            }
        }
    }

    pub async fn call_on_finish(&self, store: &mut Store<PluginState>, finish: &types::Finish) -> wasmtime::Result<String> {
        match self {
            Policy::Current(p) => p.call_on_finish(store, finish).await,
            Policy::V0_1(p) => {
                let usage = old::Usage { prompt_tokens: finish.usage.prompt_tokens, completion_tokens: finish.usage.completion_tokens };
                p.call_on_finish(store, &old::Finish { reason: finish.reason.clone(), usage }).await
            }
        }
    }
}

/// A request as a 0.1.0 plugin sees it.
fn to_old(r: &types::Request) -> old::Request {
    old::Request {
        route: r.route.clone(),
        model: r.model.clone(),
        messages: r.messages.iter().map(|m| old::Message { role: m.role.clone(), content: m.content.clone() }).collect(),
        sampling: old::Sampling {
            temperature: r.sampling.temperature,
            top_p: r.sampling.top_p,
            max_tokens: r.sampling.max_tokens,
            stop: r.sampling.stop.clone(),
        },
        principal: r.principal.clone(),
        headers: r.headers.iter().map(|h| old::Header { name: h.name.clone(), value: h.value.clone() }).collect(),
        client_addr: r.client_addr.clone(),
        prompt_tokens: r.prompt_tokens,
    }
}

/// A 0.1.0 plugin's rewrite of `before`: what that version can say, over what it cannot
/// see (checks.rs then holds the whole to the usual rules).
fn from_old(before: &types::Request, r: old::Request) -> types::Request {
    types::Request {
        route: r.route,
        model: r.model,
        messages: r.messages.into_iter().map(|m| types::Message { role: m.role, content: m.content }).collect(),
        sampling: types::Sampling {
            temperature: r.sampling.temperature,
            top_p: r.sampling.top_p,
            max_tokens: r.sampling.max_tokens,
            stop: r.sampling.stop,
        },
        principal: r.principal,
        headers: r.headers.into_iter().map(|h| types::Header { name: h.name, value: h.value }).collect(),
        client_addr: r.client_addr,
        prompt_tokens: r.prompt_tokens,
        tools: before.tools.clone(),
        tool_choice: before.tool_choice.clone(),
        parallel_tool_calls: before.parallel_tool_calls,
        response_format: before.response_format.clone(),
    }
}

// The 0.1.0 imports are the current ones under other names.

impl v0_1::wisp::policy::types::Host for PluginState {}

impl v0_1::wisp::policy::log::Host for PluginState {
    async fn log(&mut self, level: v0_1::wisp::policy::log::Level, message: String) -> wasmtime::Result<()> {
        use bindings::wisp::policy::log::{Host, Level};
        use v0_1::wisp::policy::log::Level as Old;
        let level = match level {
            Old::Debug => Level::Debug,
            Old::Info => Level::Info,
            Old::Warn => Level::Warn,
            Old::Error => Level::Error,
        };
        Host::log(self, level, message).await
    }
}

impl v0_1::wisp::policy::clock::Host for PluginState {
    async fn monotonic_ns(&mut self) -> wasmtime::Result<u64> {
        bindings::wisp::policy::clock::Host::monotonic_ns(self).await
    }

    async fn wall_ms(&mut self) -> wasmtime::Result<u64> {
        bindings::wisp::policy::clock::Host::wall_ms(self).await
    }
}

impl v0_1::wisp::policy::kv::Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        bindings::wisp::policy::kv::Host::get(self, key).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> wasmtime::Result<()> {
        bindings::wisp::policy::kv::Host::set(self, key, value, ttl_ms).await
    }

    async fn incr(&mut self, key: String, delta: i64, ttl_ms: Option<u64>) -> wasmtime::Result<i64> {
        bindings::wisp::policy::kv::Host::incr(self, key, delta, ttl_ms).await
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<bool> {
        bindings::wisp::policy::kv::Host::compare_and_swap(self, key, expected, new, ttl_ms).await
    }
}
