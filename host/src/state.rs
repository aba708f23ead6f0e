//! What every request shares: the config, the models, the plugin chain, the session store,
//! metrics and the shutdown signal. The api hands it to the pipeline; neither owns it.

use std::sync::Arc;

use crate::config::Config;
use crate::engine::{Backend, Registry};
use crate::error::ApiError;
use crate::policy::PolicyManager;
use crate::shutdown::Shutdown;
use crate::store::SessionStore;
use crate::telemetry::Metrics;

pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub policies: Arc<PolicyManager>,
    pub store: Arc<SessionStore>,
    pub shutdown: Shutdown,
}

impl AppState {
    /// The backend of the model a request names, or of the default one (loaded on first
    /// use).
    pub async fn backend(&self, id: Option<&str>) -> Result<Arc<dyn Backend>, ApiError> {
        let id = id.unwrap_or(self.registry.default_id());
        Ok(self.registry.get(id).await?)
    }
}
