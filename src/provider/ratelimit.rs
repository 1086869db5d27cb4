//! The connection's request budget: a token bucket shared by every account
//! behind one connection, which the provider guard (`guard.rs`) takes a token from
//! before every provider call, so no call can skip it.

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// Requests per second and burst when a connection sets no rateLimit.
pub const DEFAULT_RATE: (f64, u32) = (10.0, 20);

/// A token bucket: `burst` requests at once, then `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket. A rate below one request per hour is raised to that.
    pub fn new(rate: f64, burst: u32) -> Self {
        let rate = if rate.is_finite() { rate.max(1.0 / 3600.0) } else { DEFAULT_RATE.0 };
        let burst = f64::from(burst.max(1));
        Self { rate, burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// The settings it was built with.
    pub fn settings(&self) -> (f64, f64) {
        (self.rate, self.burst)
    }

    /// Waits until a request may be made, and takes its token. Waiters are
    /// served in turn (the lock is fair), so no caller starves.
    pub async fn acquire(&self) {
        let mut state = self.state.lock().await;
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - *tokens) / self.rate);
            tokio::time::sleep(wait).await;
            *tokens = 1.0;
            *last = Instant::now();
        }
        *tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let bucket = TokenBucket::new(2.0, 3);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            bucket.acquire().await;
        }
        assert!(start.elapsed() < Duration::from_millis(10), "the burst is free");
        for _ in 0..4 {
            bucket.acquire().await;
        }
        // Four more at two per second: about two seconds.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(1900) && elapsed <= Duration::from_millis(2100), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_the_budget_over_a_window() {
        let bucket = Arc::new(TokenBucket::new(5.0, 5));
        let stamps = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let bucket = bucket.clone();
                let stamps = stamps.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        bucket.acquire().await;
                        stamps.lock().unwrap().push(tokio::time::Instant::now());
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let mut stamps = stamps.lock().unwrap().clone();
        stamps.sort();
        assert_eq!(stamps.len(), 80);
        // In any one-second window: at most burst + rate * 1 s requests.
        for (i, start) in stamps.iter().enumerate() {
            let in_window = stamps[i..].iter().filter(|t| t.duration_since(*start) < Duration::from_secs(1)).count();
            assert!(in_window <= 10, "{in_window} requests in one second");
        }
    }
}
