//! Crash points for the tests' crash campaign (RELIABILITY.md), armed with
//! the `KEYSMITH_FAILPOINT` environment variable. Only with the `dev`
//! feature: the image's operator ignores the variable (SECURITY.md).
//!
//! A step is `before:WHAT` or `after:WHAT`, optionally `@N` for its N-th
//! occurrence in this process (default the first). `WHAT` is a provider
//! operation (`create_account`, `update_account`, `grant_role`,
//! `revoke_role`, `issue_key`, `verify_key`, `revoke_key`,
//! `disable_account`, `delete_account`) or an apiserver write of the account
//! controller (`publish`: the output Secret, `status`, `finalizer`,
//! `restart`: a restart target). At that step the process sends itself
//! SIGKILL: no destructor, no flush, no graceful shutdown, as a lost node.
//!
//! The two names of the first crash tests, `after-issue` and
//! `after-publish`, still exit with code 86 instead.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

/// The provider operations a step can name.
pub const PROVIDER_STEPS: [&str; 9] = [
    "create_account",
    "update_account",
    "grant_role",
    "revoke_role",
    "issue_key",
    "verify_key",
    "revoke_key",
    "disable_account",
    "delete_account",
];
/// The apiserver writes a step can name.
pub const APISERVER_STEPS: [&str; 4] = ["publish", "status", "finalizer", "restart"];

/// The armed crash point, if any, and how often it was passed.
#[derive(Debug, Clone, Default)]
pub struct Failpoints(Option<Arc<Armed>>);

#[derive(Debug)]
struct Armed {
    /// `before:issue_key`, or a legacy name.
    step: String,
    /// Which occurrence crashes (1-based).
    occurrence: u32,
    seen: AtomicU32,
    legacy: bool,
}

impl Failpoints {
    /// Reads `KEYSMITH_FAILPOINT` (only with the `dev` feature).
    pub fn from_env() -> Self {
        if !cfg!(feature = "dev") {
            return Self(None);
        }
        std::env::var("KEYSMITH_FAILPOINT").ok().filter(|v| !v.is_empty()).map_or(Self(None), |v| Self::parse(&v))
    }

    /// Arms `spec` (see the module documentation).
    pub fn parse(spec: &str) -> Self {
        let (legacy, spec) = match spec {
            "after-issue" => (true, "after:issue_key"),
            "after-publish" => (true, "after:publish"),
            other => (false, other),
        };
        let (step, occurrence) = match spec.split_once('@') {
            Some((step, n)) => (step, n.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Self(Some(Arc::new(Armed { step: step.to_owned(), occurrence, seen: AtomicU32::new(0), legacy })))
    }

    /// Passes `before:WHAT`.
    pub fn before(&self, what: &str) {
        self.hit("before", what);
    }

    /// Passes `after:WHAT`.
    pub fn after(&self, what: &str) {
        self.hit("after", what);
    }

    fn hit(&self, when: &str, what: &str) {
        let Some(armed) = &self.0 else { return };
        let Some(rest) = armed.step.strip_prefix(when) else { return };
        if rest.strip_prefix(':') != Some(what) {
            return;
        }
        if armed.seen.fetch_add(1, Ordering::SeqCst) + 1 != armed.occurrence {
            return;
        }
        tracing::error!(failpoint = %armed.step, occurrence = armed.occurrence, "failpoint hit");
        if armed.legacy {
            std::process::exit(86);
        }
        // SIGKILL to ourselves: nothing after this line runs.
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unarmed_or_other_step_passes() {
        Failpoints::default().before("issue_key");
        let armed = Failpoints::parse("after:issue_key@2");
        armed.before("issue_key");
        armed.after("verify_key");
        armed.after("issue_key"); // the first occurrence: passes
    }
}
