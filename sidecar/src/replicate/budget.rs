//! How many value bytes one scan-mode batch may hold ([`super::ScanOptions::batch_bytes`]).
//!
//! A batch is read as one MULTI of capped string reads, then DUMPs of what is left; without a
//! bound, a batch of big values is a reply of gigabytes, held by the source (its output buffer),
//! by Eden and again by the write pipeline, three batches at a time. The budget bounds each
//! read: the string read by a cap per key, the DUMPs by splitting them into groups. It is
//! approximate on purpose: the only size known before a read is MEMORY USAGE, an estimate.

use std::ops::Range;

/// The default size past which a value is copied in pieces rather than whole, in both modes.
pub(crate) const BIG_VALUE_BYTES: u64 = 16 << 20;

/// Redis's default `proto-max-bulk-len`, assumed when a target will not say its own.
const DEFAULT_BULK_LIMIT: u64 = 512 << 20;

/// The size past which a value is copied in pieces, on a target whose `proto-max-bulk-len` is
/// `target_limit` (`None`: it would not say): `configured`, or half the target's limit if that
/// is less, since a whole value travels as one RESTORE payload or SET argument, which the
/// target refuses past its limit (and closes the connection). Half, because scan mode sizes
/// values by MEMORY USAGE, an estimate; sync mode knows the payload's size exactly.
pub(crate) fn big_value_threshold(configured: u64, target_limit: Option<u64>) -> u64 {
    configured.min(target_limit.unwrap_or(DEFAULT_BULK_LIMIT) / 2)
}

/// The smallest per-key cap of the string read. A big batch over a small budget would otherwise
/// cap strings at a few bytes and send nearly all of them down the costly path (MEMORY USAGE,
/// DUMP, RESTORE) that reading strings first exists to avoid; 4 KiB keeps typical strings on
/// the cheap path while the string read stays within `keys` × 4 KiB, itself bounded by the batch
/// size.
pub(crate) const MIN_STRING_CAP: u64 = 4 << 10;

/// The `<cap>` of `GETRANGE key 0 <cap>` when `keys` keys share `budget` bytes: an equal share
/// of the budget (not below [`MIN_STRING_CAP`]), never above `big_key_bytes`, past which a
/// string is not read as one anyway.
pub(crate) fn string_cap(budget: u64, keys: usize, big_key_bytes: u64) -> u64 {
    let share = budget / (keys.max(1) as u64);
    share.max(MIN_STRING_CAP).min(big_key_bytes)
}

/// Splits keys of these sizes, in order, into consecutive groups whose sizes add up to `budget`
/// at most, the first group sharing it with `spent` bytes already held. A group closes only
/// once it holds something, so a key bigger than the budget is a group of its own, and only the
/// first group can be empty (when `spent` leaves no room for its first key).
pub(crate) fn groups(sizes: &[u64], budget: u64, spent: u64) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut held) = (0, spent);
    for (i, &size) in sizes.iter().enumerate() {
        if held > 0 && held.saturating_add(size) > budget {
            groups.push(start..i);
            (start, held) = (i, 0);
        }
        held = held.saturating_add(size);
    }
    if start < sizes.len() {
        groups.push(start..sizes.len());
    }
    groups
}

#[cfg(test)]
// `[0..2]` here is one group, not a range meant as its elements.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn groups_stay_within_the_budget_in_order() {
        assert_eq!(groups(&[10, 10, 50, 5, 5], 20, 0), [0..2, 2..3, 3..5]);
        assert_eq!(groups(&[5, 5, 5, 5], 10, 0), [0..2, 2..4]);
        assert_eq!(groups(&[1, 2, 3], 100, 0), [0..3]);
    }

    #[test]
    fn an_oversize_key_is_a_group_of_its_own() {
        assert_eq!(groups(&[100], 20, 0), [0..1]);
        assert_eq!(groups(&[5, 100, 5], 20, 0), [0..1, 1..2, 2..3]);
        assert_eq!(groups(&[u64::MAX, u64::MAX], 20, 0), [0..1, 1..2]);
        assert_eq!(groups(&[0, 0, 100, 0], 20, 0), [0..3, 3..4], "unknown sizes count as nothing");
    }

    #[test]
    fn no_keys_no_groups() {
        assert!(groups(&[], 20, 0).is_empty());
        assert!(groups(&[], 20, 100).is_empty());
    }

    #[test]
    fn the_first_group_shares_the_budget_with_what_is_held() {
        assert_eq!(groups(&[5, 10, 10], 20, 15), [0..1, 1..3]);
        assert_eq!(groups(&[10, 10], 20, 15), [0..0, 0..2], "no room left: the first group is empty");
        assert_eq!(groups(&[5, 5], 20, 10), [0..2]);
    }

    #[test]
    fn the_string_cap_is_a_share_of_the_budget_between_its_bounds() {
        assert_eq!(string_cap(32 << 20, 1000, 16 << 20), 33_554);
        assert_eq!(string_cap(64 << 10, 100, 16 << 20), MIN_STRING_CAP, "the floor");
        assert_eq!(string_cap(64 << 20, 1, 16 << 20), 16 << 20, "never past the big-value threshold");
        assert_eq!(string_cap(1 << 20, 0, 16 << 20), 1 << 20);
        assert_eq!(string_cap(32 << 20, 10, 100), 100);
    }
}
