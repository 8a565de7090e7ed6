//! `metav1.Condition` bookkeeping shared by every Eden resource's status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The condition list after observing `condition`, with Kubernetes semantics: one entry per
/// type, and `lastTransitionTime` moves only when the status actually changes.
pub fn upsert(existing: &[Condition], mut condition: Condition) -> Vec<Condition> {
    let mut conditions: Vec<Condition> = existing.iter().filter(|c| c.type_ != condition.type_).cloned().collect();
    if let Some(previous) = existing.iter().find(|c| c.type_ == condition.type_)
        && previous.status == condition.status
    {
        condition.last_transition_time = previous.last_transition_time.clone();
    }
    conditions.push(condition);
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    conditions
}

/// A condition observed now for an object at `generation`.
pub fn observed(type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Whether the condition of `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut first = observed("Ready", true, "ProbeSucceeded", "ok".into(), Some(1));
        first.last_transition_time = at(100);
        let conditions = upsert(&[], first);

        let again = upsert(&conditions, observed("Ready", true, "ProbeSucceeded", "still ok".into(), Some(2)));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].last_transition_time, at(100), "same status keeps the transition time");
        assert_eq!(again[0].message, "still ok");
        assert_eq!(again[0].observed_generation, Some(2));

        let flipped = upsert(&again, observed("Ready", false, "ProbeFailed", "refused".into(), Some(2)));
        assert_ne!(flipped[0].last_transition_time, at(100), "a new status is a transition");
        assert!(!is_true(&flipped, "Ready"));
    }

    #[test]
    fn conditions_of_other_types_are_kept_in_a_stable_order() {
        let conditions = upsert(&[], observed("Synced", false, "Waiting", String::new(), None));
        let conditions = upsert(&conditions, observed("Ready", true, "Ok", String::new(), None));
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Synced"]);
    }
}
