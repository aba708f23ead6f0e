//! Graceful shutdown as the rest of the host sees it: a leaf module, so the api (which
//! reads it) and the server (which triggers it) do not import each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// Shutdown as handlers see it: `draining` from the signal on (readiness fails, new
/// connections are refused), `ended` once the grace period is over (open streams end with
/// a clear error instead of being cut).
#[derive(Clone)]
pub struct Shutdown {
    draining: Arc<AtomicBool>,
    ended: watch::Receiver<bool>,
}

/// The server's side of [`Shutdown`].
pub struct ShutdownTrigger {
    draining: Arc<AtomicBool>,
    ended: watch::Sender<bool>,
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let draining = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { draining: draining.clone(), ended: tx }, Shutdown { draining, ended: rx })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves when the grace period is over (never, while serving normally).
    pub async fn ended(&self) {
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(|ended| *ended).await;
    }
}

impl ShutdownTrigger {
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn end(&self) {
        let _ = self.ended.send(true);
    }
}
