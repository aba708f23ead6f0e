//! Starts the HTTP server: builds the registry, preloads the default model in the
//! background (so `/health` answers at once and `/ready` flips when it is loaded), binds,
//! serves, and shuts down gracefully on SIGTERM or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use salvo::conn::{Acceptor, TcpListener};
use salvo::prelude::*;

use crate::api;
use crate::config::Config;
use crate::engine::Registry;
use crate::policy::PolicyEngine;
use crate::policy::PolicyManager;
use crate::policy::checks::RequestRules;
use crate::policy::kv::{KvBackend, KvQuota};
use crate::shutdown::Shutdown;
use crate::state::AppState;
use crate::store::SessionStore;
use crate::store::kv::{RedisKv, SqlKv, SqliteKv};
use crate::telemetry::Metrics;

/// After the grace period, the time streams get to send their closing error and hang up.
const SHUTDOWN_LAST_WORDS: Duration = Duration::from_secs(5);

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let addr = config.listen_addr()?;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new(&config, metrics.clone())?);
    for id in registry.preload_ids() {
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = registry.get(&id).await {
                tracing::error!(model = %id, error = %e, "preloading failed");
            }
        });
    }
    registry.spawn_keep_alive();
    let store = Arc::new(SessionStore::connect(&config.store).await.with_context(|| format!("opening the store `{}`", config.store.url))?);
    let kv: Arc<dyn KvBackend> = match &config.store.kv_url {
        Some(url) => Arc::new(RedisKv::connect(url, "wisp:kv:").await?),
        None if store.backend() == crate::store::Backend::Sqlite => {
            Arc::new(SqliteKv::open(store.pool().clone(), KvQuota::default()).await?)
        }
        None => Arc::new(SqlKv::new(store.pool().clone())),
    };
    let engine = PolicyEngine::new(kv.clone(), metrics.clone(), RequestRules::from_config(&config))?;
    let policies = PolicyManager::new(engine, &config.plugins, config.source.clone()).await?;
    if config.source.is_some() {
        policies.watch().context("watching the config and plugin files")?;
    }
    #[cfg(unix)]
    {
        let policies = policies.clone();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let _ = policies.reload().await;
            }
        });
    }
    tracing::info!(plugins = ?policies.current().info().iter().map(|p| p.name.clone()).collect::<Vec<_>>(), "policy chain loaded");
    let (trigger, shutdown) = Shutdown::new();
    let state = Arc::new(AppState { config: config.clone(), registry, metrics, policies, store, shutdown });
    let acceptor = TcpListener::new(addr).try_bind().await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = acceptor.holdings().first().map(|h| h.local_addr.to_string()).unwrap_or_else(|| addr.to_string());
    let local = local.trim_start_matches("socket://");
    // Tests and scripts read this line to find a port chosen with `:0`.
    println!("wisp listening on http://{local}");
    tracing::info!(address = %local, default_model = %config.default_model().id, "serving");
    let server = Server::new(acceptor);
    let handle = server.handle();
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(grace_seconds = grace.as_secs(), "shutting down: no new connections, in-flight requests may finish");
        trigger.drain();
        handle.stop_graceful(Some(grace + SHUTDOWN_LAST_WORDS));
        tokio::time::sleep(grace).await;
        tracing::warn!("grace period over: ending open streams");
        trigger.end();
    });
    server.serve(api::service(state)).await;
    if let Err(e) = kv.flush().await {
        tracing::error!(error = %e, "the plugins' kv could not be written to the store before exiting");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix; this is a bug");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
