//! A one-way flag that tasks on any runtime can wait for: once set, it
//! stays set, and every waiter, present or later, is let through.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Latch {
    set: AtomicBool,
    notify: Notify,
}

impl Latch {
    pub fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the latch is set (at once if it is already).
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the check, so a set() in between is not missed.
        notified.as_mut().enable();
        if self.is_set() {
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
    async fn waiters_pass_once_set_and_later_ones_at_once() {
        let latch = Arc::new(Latch::default());
        let waiter = {
            let latch = Arc::clone(&latch);
            tokio::spawn(async move { latch.wait().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        latch.set();
        waiter.await.unwrap();
        latch.wait().await;
        assert!(latch.is_set());
    }
}
