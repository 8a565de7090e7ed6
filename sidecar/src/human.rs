//! Numbers and times as people read them on a terminal: `1,234,567` keys, `2m10s`, a progress
//! bar. Shared by `eden-sidecar replicate`'s progress and `kubectl eden status`.

/// `1234567` → `1,234,567`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Seconds as kubectl shows ages: `45s`, `2m10s`, `1h5m`, `3d4h`.
pub fn duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// `part` of `whole` in whole percent, 0–100; nothing to do is all done.
pub fn percent(part: i64, whole: i64) -> i64 {
    if whole <= 0 { 100 } else { (part * 100 / whole).clamp(0, 100) }
}

/// A bar of 20 cells for `percent`, a cell filled per started 5 %.
pub fn bar(percent: i64) -> String {
    let filled = (percent.clamp(0, 100) as usize).div_ceil(5);
    "█".repeat(filled) + &"░".repeat(20 - filled)
}

/// Seconds left to copy `total` keys at `keys_per_second`, `copied` done; `None` when done or
/// at no rate.
pub fn eta_seconds(copied: i64, total: i64, keys_per_second: f64) -> Option<i64> {
    (keys_per_second > 0.0 && copied < total).then(|| ((total - copied) as f64 / keys_per_second).ceil() as i64)
}

/// `copied/total` keys with the bar, and the rate and the time left at it while copying.
pub fn copy_progress(copied: i64, total: i64, keys_per_second: Option<f64>) -> String {
    let percent = percent(copied, total);
    let mut text = format!("{} {percent}%  {} / {} keys", bar(percent), thousands(copied), thousands(total));
    if let Some(rate) = keys_per_second.filter(|rate| *rate > 0.0) {
        text += &format!("  {} keys/s", thousands(rate.round() as i64));
        if let Some(eta) = eta_seconds(copied, total, rate) {
            text += &format!("  ETA {}", duration(eta));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_ages_read_as_kubectl_shows_them() {
        assert_eq!(
            [thousands(0), thousands(999), thousands(1000), thousands(-1234567)],
            ["0", "999", "1,000", "-1,234,567"]
        );
        assert_eq!([duration(45), duration(130), duration(3900), duration(273600)], ["45s", "2m10s", "1h5m", "3d4h"]);
        assert_eq!(percent(5, 0), 100, "nothing to copy is all copied");
        assert_eq!(
            [bar(0).chars().filter(|c| *c == '█').count(), bar(1).chars().filter(|c| *c == '█').count()],
            [0, 1]
        );
        assert_eq!(
            copy_progress(600_000, 1_000_000, Some(1000.0)),
            "████████████░░░░░░░░ 60%  600,000 / 1,000,000 keys  1,000 keys/s  ETA 6m40s"
        );
        assert_eq!(
            copy_progress(5, 5, Some(2.0)),
            "████████████████████ 100%  5 / 5 keys  2 keys/s",
            "no ETA once done"
        );
    }
}
