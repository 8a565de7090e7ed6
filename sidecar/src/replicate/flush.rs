//! Noticing FLUSHDB / FLUSHALL on the source, which send no per-key notifications.
//!
//! The reliable signal is the call counters in `INFO commandstats`: any change (a flush, or a
//! CONFIG RESETSTAT) counts as a flush, and the caller flushes the target and rescans — a
//! needless rescan is safe, a missed flush is not (under `skip` and `fail` the caller stops
//! instead, so there a CONFIG RESETSTAT stops replication too). Servers that hide commandstats fall back to
//! DBSIZE dropping to 0.

use redis::cmd;

use super::ReplicateError;
use super::endpoint::Endpoint;

#[derive(Default)]
pub(crate) struct FlushWatch {
    /// flushdb + flushall calls at the last check; `None` before the first check or when the
    /// server hides commandstats.
    calls: Option<u64>,
    dbsize: u64,
}

impl FlushWatch {
    /// Takes the first reading; later [`FlushWatch::flushed`] calls compare against it.
    pub(crate) async fn start(source: &Endpoint) -> Result<Self, ReplicateError> {
        let mut watch = FlushWatch::default();
        watch.flushed(source).await?;
        Ok(watch)
    }

    /// Whether the source was flushed since the last check.
    pub(crate) async fn flushed(&mut self, source: &Endpoint) -> Result<bool, ReplicateError> {
        let dbsize: u64 = source.cmd("DBSIZE", &cmd("DBSIZE")).await?;
        let emptied = self.dbsize > 0 && dbsize == 0;
        self.dbsize = dbsize;
        let calls = match source.cmd::<String>("INFO commandstats", cmd("INFO").arg("commandstats")).await {
            Ok(text) => flush_calls(&text),
            // Lost, not hidden: the caller reconnects and asks again.
            Err(err) if err.is_disconnect() => return Err(err),
            Err(_hidden) => None,
        };
        let changed = match (self.calls, calls) {
            (Some(before), Some(now)) => before != now,
            (_, None) => emptied,
            (None, Some(_)) => false,
        };
        self.calls = calls;
        Ok(changed)
    }
}

/// flushdb + flushall `calls=` from an INFO commandstats reply (0 when neither ran yet).
fn flush_calls(info: &str) -> Option<u64> {
    if !info.contains("# Commandstats") {
        return None;
    }
    let calls = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.strip_prefix(":calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(calls("cmdstat_flushdb") + calls("cmdstat_flushall"))
}

#[cfg(test)]
mod tests {
    use super::flush_calls;

    #[test]
    fn sums_flush_counters() {
        let info = "# Commandstats\r\ncmdstat_flushdb:calls=2,usec=5\r\ncmdstat_flushall:calls=1,usec=3\r\n";
        assert_eq!(flush_calls(info), Some(3));
        assert_eq!(flush_calls("# Commandstats\r\ncmdstat_get:calls=9\r\n"), Some(0));
        assert_eq!(flush_calls(""), None);
    }
}
