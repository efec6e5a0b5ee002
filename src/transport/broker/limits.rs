//! The per-connection limits that keep one bad device from hurting the ward: a message rate
//! (a token bucket) and a number of messages in flight (taken in, not yet acknowledged).
//!
//! Past either limit the connection is not read until it is back within it. Nothing is
//! refused or dropped: a publish that is taken in is stored and acknowledged like any other,
//! so the limits cost a flooding device its own speed and nobody else anything (its bytes wait
//! in its own TCP window, not in this process).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Publishes per second on average, `burst` at once.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit {
            per_second: f64::from(per_second.max(1)),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes one message's token: `None` if there was one, else how long until there is.
    pub fn take(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return None;
        }
        Some(Duration::from_secs_f64(
            (1.0 - self.tokens) / self.per_second,
        ))
    }
}

/// Messages of one connection taken in and not yet acknowledged. The reader adds, the writer
/// (which sends the acknowledgements) takes away.
#[derive(Debug, Default)]
pub struct Inflight {
    n: AtomicUsize,
    room: Notify,
}

impl Inflight {
    pub fn count(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    pub fn add(&self) {
        self.n.fetch_add(1, Ordering::AcqRel);
    }

    /// `n` acknowledgements went out.
    pub fn done(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .n
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        self.room.notify_waiters();
    }

    /// Waits until fewer than `max` are in flight.
    pub async fn room(&self, max: usize) {
        loop {
            let notified = self.room.notified();
            if self.count() < max {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_lets_a_burst_through_then_the_average() {
        let mut r = RateLimit::new(10, 5);
        for _ in 0..5 {
            assert_eq!(r.take(), None);
        }
        let wait = r.take().expect("the burst is spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        tokio::time::advance(wait).await;
        assert_eq!(r.take(), None, "a token came back");
        assert!(r.take().is_some());
        // Over a long quiet time the bucket fills up to the burst, no further.
        tokio::time::advance(Duration::from_secs(60)).await;
        let through = (0..100).take_while(|_| r.take().is_none()).count();
        assert_eq!(through, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn room_in_flight_comes_back_with_acknowledgements() {
        let f = std::sync::Arc::new(Inflight::default());
        f.add();
        f.add();
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.room(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "two in flight: at the limit");
        f.done(1);
        waiter.await.unwrap();
        assert_eq!(f.count(), 1);
        f.done(5);
        assert_eq!(f.count(), 0, "never below zero");
    }
}
