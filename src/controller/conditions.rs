//! Building status conditions that only change when their meaning does, so
//! an unchanged object costs no status write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition's content, without its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate {
    /// The condition type (`Ready`, `KeyReady`...).
    pub type_: &'static str,
    /// Whether it holds.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: String,
    /// What a user should know, never key material.
    pub message: String,
}

impl ConditionUpdate {
    /// A condition that holds.
    pub fn truthy(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status: true, reason: reason.into(), message: message.into() }
    }
    /// A condition that does not hold.
    pub fn falsy(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status: false, reason: reason.into(), message: message.into() }
    }
}

/// Merges `updates` into `existing`: a condition whose status is unchanged
/// keeps its lastTransitionTime; conditions of other types are kept as they
/// are. The result is sorted by type, so it compares stably.
pub fn merge_conditions(
    existing: &[Condition],
    updates: &[ConditionUpdate],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> =
        existing.iter().filter(|c| !updates.iter().any(|u| u.type_ == c.type_)).cloned().collect();
    for update in updates {
        let status = if update.status { "True" } else { "False" };
        let previous = existing.iter().find(|c| c.type_ == update.type_);
        let last_transition_time = match previous {
            Some(prev) if prev.status == status => prev.last_transition_time.clone(),
            _ => now.clone(),
        };
        out.push(Condition {
            type_: update.type_.to_owned(),
            status: status.to_owned(),
            reason: update.reason.clone(),
            message: update.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Whether the condition of this type is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = merge_conditions(&[], &[ConditionUpdate::falsy("Ready", "Waiting", "w")], Some(1), &at(10));
        assert_eq!(first[0].last_transition_time, at(10));
        let same = merge_conditions(&first, &[ConditionUpdate::falsy("Ready", "StillWaiting", "w2")], Some(2), &at(20));
        assert_eq!(same[0].last_transition_time, at(10));
        assert_eq!(same[0].reason, "StillWaiting");
        let flipped = merge_conditions(&same, &[ConditionUpdate::truthy("Ready", "Done", "d")], Some(2), &at(30));
        assert_eq!(flipped[0].last_transition_time, at(30));
        assert!(is_true(&flipped, "Ready"));
    }

    #[test]
    fn unchanged_input_gives_identical_output() {
        let updates = [ConditionUpdate::truthy("Ready", "A", "a"), ConditionUpdate::falsy("KeyReady", "B", "b")];
        let once = merge_conditions(&[], &updates, Some(3), &at(1));
        let twice = merge_conditions(&once, &updates, Some(3), &at(99));
        assert_eq!(once, twice);
        assert_eq!(once[0].type_, "KeyReady");
    }
}
