//! # wisp-sdk
//!
//! Everything a wisp governance plugin needs: the types of the `wisp:policy` WIT contract,
//! the host's imports (log, clock, kv), a [`Policy`] trait whose hooks all have no-op
//! defaults, and [`export_policy!`] to turn an implementation into a component.
//!
//! The host creates a fresh instance for every request: `init` runs with the plugin's
//! `config` table (as JSON), then `on_request`, then `on_chunk` for each piece of output,
//! then `on_finish`. Fields of your policy therefore live for exactly one request; state
//! that must last longer belongs in [`kv`].
//!
//! A request carries what its reply must be: the [`Tool`]s offered, the [`ToolChoice`] and
//! the [`ResponseFormat`]. A policy may rewrite them (remove tools a caller may not use,
//! force a schema); the host holds a rewrite to the rules a client's request keeps and
//! enforces the result by grammar. This SDK builds `wisp:policy@0.2.0` components; the host
//! still loads components built for 0.1.0, which do not see these fields.
//!
//! ```no_run
//! use wisp_sdk::{ChunkResult, Denial, Policy, Request, Verdict};
//!
//! /// Refuses prompts that mention a secret word; shouts the output.
//! struct NoSecrets { word: String }
//!
//! impl Policy for NoSecrets {
//!     fn init(config: &str) -> Result<Self, String> {
//!         // config is the plugin's `config` table as JSON, e.g. {"word":"xyzzy"}
//!         let word = config.split('"').nth(3).ok_or("config needs a word")?;
//!         Ok(NoSecrets { word: word.to_string() })
//!     }
//!     fn on_request(&mut self, req: &Request) -> Verdict {
//!         match req.messages.iter().any(|m| m.content.contains(&self.word)) {
//!             true => Verdict::Deny(Denial { status: 400, code: "secret".into(), message: "no secrets".into() }),
//!             false => Verdict::Allow,
//!         }
//!     }
//!     fn on_chunk(&mut self, text: &str) -> ChunkResult {
//!         ChunkResult { emit: text.to_uppercase(), stop: false }
//!     }
//! }
//!
//! wisp_sdk::export_policy!(NoSecrets);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` is a component.
//! `wisp plugin new NAME` writes a crate like this one.

#![deny(missing_docs)]

#[doc(hidden)]
pub mod bindings {
    //! Generated from `wit/policy.wit`.
    #![allow(missing_docs)]
    wit_bindgen::generate!({
        path: "../wit",
        world: "policy",
        pub_export_macro: true,
        default_bindings_module: "wisp_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

pub use bindings::wisp::policy::types::{
    ChunkResult, Denial, Finish, Header, JsonSchema, Message, Request, ResponseFormat, Sampling, Tool, ToolChoice, Usage, Verdict,
};
pub use wisp_holdback::{StopMatcher, held_suffix_len};

/// The host's key-value space, private to this plugin (shared by all requests and replicas).
pub mod kv {
    pub use crate::bindings::wisp::policy::kv::{compare_and_swap, get, incr, set};
}

/// Time from the host.
pub mod clock {
    pub use crate::bindings::wisp::policy::clock::{monotonic_ns, wall_ms};
}

/// Logging into the host's logs, tagged with the plugin's name.
pub mod log {
    use crate::bindings::wisp::policy::log::{Level, log};

    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    /// Logs at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    /// Logs at error level.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

/// A governance policy. Implement `init` and the hooks you need; the others pass through.
pub trait Policy: Sized + 'static {
    /// Builds the policy from its `config` table (JSON). An error refuses the plugin.
    fn init(config: &str) -> Result<Self, String>;

    /// Gates the request: allow, deny, or rewrite it.
    fn on_request(&mut self, _request: &Request) -> Verdict {
        Verdict::Allow
    }

    /// Sees each piece of output text; returns what to emit now and whether to stop.
    fn on_chunk(&mut self, text: &str) -> ChunkResult {
        ChunkResult { emit: text.to_string(), stop: false }
    }

    /// The end of the output: returns text still held back.
    fn on_finish(&mut self, _finish: &Finish) -> String {
        String::new()
    }
}

/// Exports a [`Policy`] implementation as the component's `wisp:policy` world.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        static __WISP_POLICY: ::std::sync::Mutex<::std::option::Option<$policy>> = ::std::sync::Mutex::new(None);

        fn __wisp_with<R>(f: impl FnOnce(&mut $policy) -> R) -> R {
            let mut guard = __WISP_POLICY.lock().unwrap_or_else(|e| e.into_inner());
            let policy = guard.as_mut().expect("the host calls init before any hook");
            f(policy)
        }

        struct __WispExport;

        impl $crate::bindings::Guest for __WispExport {
            fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                let policy = <$policy as $crate::Policy>::init(&config)?;
                *__WISP_POLICY.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy);
                Ok(())
            }
            fn on_request(request: $crate::Request) -> $crate::Verdict {
                __wisp_with(|p| $crate::Policy::on_request(p, &request))
            }
            fn on_chunk(text: ::std::string::String) -> $crate::ChunkResult {
                __wisp_with(|p| $crate::Policy::on_chunk(p, &text))
            }
            fn on_finish(finish: $crate::Finish) -> ::std::string::String {
                __wisp_with(|p| $crate::Policy::on_finish(p, &finish))
            }
        }

        $crate::bindings::export!(__WispExport with_types_in $crate::bindings);
    };
}
