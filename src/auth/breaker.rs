//! A circuit breaker in front of a remote auth source (LDAP, HTTP): after
//! `failures` "unavailable" answers in a row the circuit opens, and for
//! `open_for` every login is answered "unavailable" at once instead of
//! waiting out the source's timeout. Then logins go through again; the
//! first failure reopens the circuit, the first answer (yes or no) closes
//! it. Nothing waits on a probe, so nothing can stick.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::time::Instant;

use super::{AuthContext, AuthError, AuthFuture, Authenticator};
use crate::imap::Secret;

pub struct Breaker {
    inner: Box<dyn Authenticator>,
    failures: u32,
    open_for: Duration,
    state: Mutex<State>,
    open_gauge: IntGauge,
    rejected: IntCounter,
}

#[derive(Default)]
struct State {
    /// Unavailable answers in a row.
    consecutive: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    pub fn new(
        inner: Box<dyn Authenticator>,
        failures: u32,
        open_for: Duration,
        open_gauge: IntGauge,
        rejected: IntCounter,
    ) -> Breaker {
        open_gauge.set(0);
        Breaker {
            inner,
            failures: failures.max(1),
            open_for,
            state: Mutex::new(State::default()),
            open_gauge,
            rejected,
        }
    }

    /// Whether a login may go to the source now.
    fn admit(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap();
        match state.open_until {
            Some(until) if until > now => Err(until - now),
            Some(_) => {
                state.open_until = None;
                self.open_gauge.set(0);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record(&self, unavailable: bool, now: Instant) {
        let mut state = self.state.lock().unwrap();
        if !unavailable {
            state.consecutive = 0;
            state.open_until = None;
            self.open_gauge.set(0);
            return;
        }
        state.consecutive = state.consecutive.saturating_add(1);
        if state.consecutive >= self.failures && state.open_until.is_none() {
            state.open_until = Some(now + self.open_for);
            self.open_gauge.set(1);
            tracing::warn!(
                source = self.inner.name(),
                failures = state.consecutive,
                open_s = self.open_for.as_secs_f64(),
                "auth source unavailable; answering logins at once until it is retried"
            );
        }
    }
}

impl Authenticator for Breaker {
    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: Secret,
        ctx: &'a AuthContext,
    ) -> AuthFuture<'a> {
        Box::pin(async move {
            if let Err(left) = self.admit(Instant::now()) {
                self.rejected.inc();
                return Err(AuthError::Unavailable(format!(
                    "circuit open for {:.1}s more after repeated failures",
                    left.as_secs_f64()
                )));
            }
            let answer = self.inner.authenticate(user, password, ctx).await;
            self.record(
                matches!(answer, Err(AuthError::Unavailable(_))),
                Instant::now(),
            );
            answer
        })
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    /// Unavailable while `down`, else accepts; counts calls.
    struct Flaky(Arc<AtomicBool>, Arc<AtomicU32>);

    impl Authenticator for Flaky {
        fn authenticate<'a>(
            &'a self,
            user: &'a str,
            _password: Secret,
            _ctx: &'a AuthContext,
        ) -> AuthFuture<'a> {
            self.1.fetch_add(1, Ordering::Relaxed);
            let down = self.0.load(Ordering::Relaxed);
            Box::pin(async move {
                if down {
                    Err(AuthError::Unavailable("down".into()))
                } else {
                    Ok(Identity {
                        user: user.to_owned(),
                        backend: None,
                        pool: None,
                        backend_password: None,
                    })
                }
            })
        }
        fn name(&self) -> &'static str {
            "flaky"
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_repeated_failures_and_closes_on_an_answer() {
        let down = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let gauge = IntGauge::new("g", "g").unwrap();
        let rejected = IntCounter::new("r", "r").unwrap();
        let b = Breaker::new(
            Box::new(Flaky(Arc::clone(&down), Arc::clone(&calls))),
            3,
            Duration::from_secs(10),
            gauge.clone(),
            rejected.clone(),
        );
        let ctx = AuthContext::test();
        let login = || b.authenticate("alice", Secret::new(b"pw".to_vec()), &ctx);
        for _ in 0..3 {
            assert!(matches!(login().await, Err(AuthError::Unavailable(_))));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert_eq!(gauge.get(), 1);
        // Open: answered without the source.
        assert!(matches!(login().await, Err(AuthError::Unavailable(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert_eq!(rejected.get(), 1);
        // After open_for the source is tried; still down: open again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(login().await, Err(AuthError::Unavailable(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        assert!(matches!(login().await, Err(AuthError::Unavailable(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        // Back: the first answer closes the circuit.
        down.store(false, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(login().await.is_ok());
        assert_eq!(gauge.get(), 0);
        assert!(login().await.is_ok());
        assert_eq!(calls.load(Ordering::Relaxed), 6);
    }
}
