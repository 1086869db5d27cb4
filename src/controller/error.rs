//! Why a reconcile failed, and how long to wait before the next attempt.

use std::time::Duration;

use crate::provider::ProviderError;

/// Why a reconcile failed. Most problems are not errors but conditions; these
/// are the failures worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The target app failed.
    #[error("{0}")]
    Provider(#[from] ProviderError),
    /// A cache was not ready (the operator is starting).
    #[error("caches are not ready yet")]
    NotReady,
}

impl Error {
    /// A stable name for metrics labels and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::Provider(e) => e.category(),
            Error::NotReady => "NotReady",
        }
    }

    /// The target's own Retry-After, if it gave one.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Provider(ProviderError::Transient { retry_after, .. }) => *retry_after,
            _ => None,
        }
    }
}

/// Exponential backoff with ±20 % jitter: 1 s, 2 s, 4 s ... up to 5 minutes.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(9)).min(Duration::from_secs(300));
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    base.mul_f64(jitter)
}

/// How long to wait after `error`: the target's Retry-After when it gave
/// one, else the object's next backoff step.
pub fn retry_delay(error: &Error, backoff: impl FnOnce() -> Duration) -> Duration {
    error.retry_after().unwrap_or_else(backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_wins_over_backoff() {
        let limited = Error::Provider(ProviderError::Transient {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(7)),
        });
        assert_eq!(retry_delay(&limited, || Duration::from_secs(1)), Duration::from_secs(7));
        let flaky = Error::Provider(ProviderError::transient("503"));
        assert_eq!(retry_delay(&flaky, || Duration::from_secs(2)), Duration::from_secs(2));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps_at_five_minutes() {
        for attempt in 1..=30 {
            let expected = Duration::from_secs(1u64 << (attempt - 1).min(9)).min(Duration::from_secs(300));
            let got = backoff(attempt);
            assert!(got >= expected.mul_f64(0.8) && got <= expected.mul_f64(1.2), "attempt {attempt}: {got:?}");
        }
        let samples: std::collections::BTreeSet<u128> = (0..20).map(|_| backoff(3).as_millis()).collect();
        assert!(samples.len() > 1, "backoff is jittered");
    }
}
