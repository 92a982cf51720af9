//! Graceful shutdown, in two steps the main thread drives on SIGTERM:
//! first the listeners stop accepting (readiness already reports 503),
//! then, after the drain period, every relayed session is told
//! `* BYE [UNAVAILABLE] Server shutting down` and closed, so clients
//! reconnect to another replica.
//!
//! Shared by the worker threads' runtimes: latches only, no runtime of its
//! own.

use crate::latch::Latch;

#[derive(Default)]
pub struct Shutdown {
    stop: Latch,
    close: Latch,
}

impl Shutdown {
    /// Listeners stop accepting.
    pub fn stop_accepting(&self) {
        self.stop.set();
    }

    /// Resolves once the listeners must stop accepting.
    pub async fn accepting_stopped(&self) {
        self.stop.wait().await
    }

    /// Relayed sessions end now.
    pub fn close_sessions(&self) {
        self.close.set();
    }

    pub fn is_closing(&self) -> bool {
        self.close.is_set()
    }

    /// Resolves once relayed sessions must end.
    pub async fn sessions_closing(&self) {
        self.close.wait().await
    }
}
