//! Graceful shutdown, in two steps the main thread drives on SIGTERM:
//! first the listeners stop accepting (readiness already reports 503),
//! then, after the drain period, every relayed session is told
//! `* BYE [UNAVAILABLE] Server shutting down` and closed, so clients
//! reconnect to another replica.
//!
//! Shared by the worker threads' runtimes: flags and notifications only,
//! no runtime of its own.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Shutdown {
    stopped: AtomicBool,
    stop: Notify,
    closing: AtomicBool,
    close: Notify,
}

impl Shutdown {
    /// Listeners stop accepting.
    pub fn stop_accepting(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }

    /// Resolves once the listeners must stop accepting.
    pub async fn accepting_stopped(&self) {
        let notified = self.stop.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// Relayed sessions end now.
    pub fn close_sessions(&self) {
        self.closing.store(true, Ordering::Release);
        self.close.notify_waiters();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Resolves once relayed sessions must end.
    pub async fn sessions_closing(&self) {
        let notified = self.close.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_closing() {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waiters_wake_and_late_waiters_return_at_once() {
        let s = Arc::new(Shutdown::default());
        let waiter = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.accepting_stopped().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.stop_accepting();
        waiter.await.unwrap();
        s.accepting_stopped().await;
        assert!(!s.is_closing());
        s.close_sessions();
        s.sessions_closing().await;
    }
}
