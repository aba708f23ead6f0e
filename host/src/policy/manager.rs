//! Hot reload: the live chain sits in an `ArcSwap`; a reload re-reads the config file,
//! builds and initialises a complete new chain, and only then swaps it in. A config or
//! plugin that fails to load is refused with a clear log line (and admin error) while the
//! old chain keeps serving. Requests in flight keep the chain they started with.
//!
//! Reloads are triggered by file changes (notify, on the config file and every plugin's
//! wasm), SIGHUP, and `POST /admin/plugins/reload`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};

use super::{PluginConfig, PluginInfo, PolicyChain, PolicyEngine, PolicyError};
use crate::config::{Config, ConfigError};

/// Changes arriving within this window become one reload (editors write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(150);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the new config is invalid: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

pub struct PolicyManager {
    engine: Arc<PolicyEngine>,
    current: ArcSwap<PolicyChain>,
    /// The config file plugins are re-read from (none: built-in defaults, nothing to reload).
    config_path: Option<PathBuf>,
    /// Serialises reloads so two triggers never race to swap.
    reloading: tokio::sync::Mutex<()>,
}

impl PolicyManager {
    pub async fn new(
        engine: Arc<PolicyEngine>,
        plugins: &[PluginConfig],
        config_path: Option<PathBuf>,
    ) -> Result<Arc<PolicyManager>, PolicyError> {
        let chain = PolicyChain::load(engine.clone(), plugins).await?;
        Ok(Arc::new(PolicyManager { engine, current: ArcSwap::from_pointee(chain), config_path, reloading: tokio::sync::Mutex::new(()) }))
    }

    /// The chain new requests use.
    pub fn current(&self) -> Arc<PolicyChain> {
        self.current.load_full()
    }

    /// Re-reads the config file and swaps in the new chain, or keeps the old one.
    pub async fn reload(&self) -> Result<Vec<PluginInfo>, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let plugins = match &self.config_path {
            Some(path) => Config::load(Some(path))?.plugins,
            None => Vec::new(),
        };
        match PolicyChain::load(self.engine.clone(), &plugins).await {
            Ok(chain) => {
                let info = chain.info();
                self.current.store(Arc::new(chain));
                tracing::info!(plugins = ?info.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), "policy chain reloaded");
                Ok(info)
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the previous chain keeps serving");
                Err(e.into())
            }
        }
    }

    /// The files whose change triggers a reload: the config and every plugin's wasm.
    fn watched_files(&self) -> HashSet<PathBuf> {
        let mut files: HashSet<PathBuf> = self.current().plugins.iter().map(|p| absolute(&p.config.wasm)).collect();
        files.extend(self.config_path.as_deref().map(absolute));
        files
    }

    /// Watches the config and plugin files and reloads on change, until the process ends.
    pub fn watch(self: &Arc<Self>) -> notify::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && !event.kind.is_access()
            {
                let _ = tx.send(event.paths);
            }
        })?;
        let mut dirs = HashSet::new();
        for file in self.watched_files() {
            if let Some(dir) = file.parent()
                && dirs.insert(dir.to_path_buf())
            {
                watcher.watch(dir, RecursiveMode::NonRecursive)?;
            }
        }
        let manager = self.clone();
        tokio::spawn(async move {
            let mut watcher = watcher;
            let mut dirs = dirs;
            while let Some(paths) = rx.recv().await {
                let files = manager.watched_files();
                if !paths.iter().any(|p| files.contains(&absolute(p))) {
                    continue;
                }
                // Let the burst settle, then drain it.
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                if manager.reload().await.is_ok() {
                    for file in manager.watched_files() {
                        if let Some(dir) = file.parent()
                            && dirs.insert(dir.to_path_buf())
                        {
                            let _ = watcher.watch(dir, RecursiveMode::NonRecursive);
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
