//! The target side of sync mode: one connection, the database it has selected, and the
//! position record that makes the stream's application exactly-once.
//!
//! Why a record on the target. Stream commands are not idempotent (INCR, LPUSH...), so after a
//! crash Eden must know exactly which of them the target has applied. Every batch of stream
//! commands runs in one MULTI/EXEC that also sets [`POSITION_KEY`] to the replication ID and
//! offset the batch ends at: the target holds the commands and the record together or
//! neither. A restart reads the record and asks the source to continue from there. The record
//! lives in database 0; the verifier ignores it, and it can be deleted once replication is over.

use std::num::NonZeroU32;

use redis_protocol::resp2::types::BytesFrame;

use super::link::{Link, encode_into, text};
use crate::replicate::ReplicateError;
use crate::replicate::freshness::{FRESHNESS_KEY, TRUSTED_FOR};
use crate::replicate::pace::Pace;

/// The key on the target that records how far the stream has been applied.
pub const POSITION_KEY: &str = "eden:sync:position";

/// A replication ID, the offset applied through, the database the stream had selected there
/// (a continued stream does not repeat its SELECT), and whether the target may still hold
/// expiries shifted by the expiry hold ([`super::hold`]), which a restart must then settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) replid: String,
    pub(crate) offset: u64,
    pub(crate) db: u64,
    pub(crate) held: bool,
}

impl Position {
    /// `<replid> <offset> <db>`, then ` held` during the hold: records written before the hold
    /// existed read as not held.
    fn encode(&self) -> String {
        let held = if self.held { " held" } else { "" };
        format!("{} {} {}{held}", self.replid, self.offset, self.db)
    }

    fn decode(text: &str) -> Option<Self> {
        let mut words = text.split(' ');
        let replid = words.next()?.to_string();
        let (offset, db) = (words.next()?.parse().ok()?, words.next()?.parse().ok()?);
        let held = match words.next() {
            None => false,
            Some("held") => true,
            Some(_) => return None,
        };
        Some(Position { replid, offset, db, held })
    }
}

/// The connection to the target, the database it has selected, and the operations-per-second
/// limit every batch sent to it counts against.
pub(crate) struct Target {
    pub(crate) link: Link,
    pub(crate) db: u64,
    pub(crate) pace: Pace,
}

impl Target {
    pub(crate) fn new(link: Link, per_second: Option<NonZeroU32>) -> Self {
        Target { link, db: 0, pace: Pace::new(per_second) }
    }

    /// Appends a SELECT to `out` when `db` is not the selected database, and returns how many
    /// commands it appended (0 or 1).
    pub(crate) fn select(&mut self, out: &mut Vec<u8>, db: u64) -> usize {
        if db == self.db {
            return 0;
        }
        encode_into(out, &[b"SELECT", db.to_string().as_bytes()]);
        self.db = db;
        1
    }

    /// Appends the commands that record `position` (in database 0); returns how many.
    pub(crate) fn record(&mut self, out: &mut Vec<u8>, position: &Position) -> usize {
        let selects = self.select(out, 0);
        encode_into(out, &[b"SET", POSITION_KEY.as_bytes(), position.encode().as_bytes()]);
        selects + 1
    }

    /// The recorded position, if a previous run left one.
    pub(crate) async fn recorded(&mut self) -> Result<Option<Position>, ReplicateError> {
        let mut request = Vec::new();
        let selects = self.select(&mut request, 0);
        encode_into(&mut request, &[b"GET", POSITION_KEY.as_bytes()]);
        self.link.send(&request).await?;
        for _ in 0..selects {
            self.expect_ok("SELECT").await?;
        }
        match self.link.reply().await? {
            BytesFrame::Null => Ok(None),
            BytesFrame::Error(err) => Err(self.link.error(format!("`GET {POSITION_KEY}` failed: {err}"))),
            reply => Ok(text(&reply).and_then(Position::decode)),
        }
    }

    /// The target's `proto-max-bulk-len`; `None` when it does not say (CONFIG refused, as on
    /// many managed services).
    pub(crate) async fn bulk_limit(&mut self) -> Result<Option<u64>, ReplicateError> {
        Ok(match self.link.call(&[b"CONFIG", b"GET", b"proto-max-bulk-len"]).await? {
            BytesFrame::Array(pair) => pair.get(1).and_then(text).and_then(|limit| limit.parse().ok()),
            _ => None,
        })
    }

    /// Empties the target before a full resync: it holds an earlier copy of this source, and
    /// keys deleted on the source since would otherwise survive.
    ///
    /// Sidecars read the target for the source only while they see its freshness record, and
    /// at most [`TRUSTED_FOR`] after they last saw it (DESIGN §9, "Freshness"): the record goes
    /// first, and the data only once every such trust has run out (twice over, for clocks that
    /// run at slightly different rates). A beat still on its way either finds no record to
    /// overwrite (it is written `XX`) or, written plainly, follows nothing a sidecar saw.
    pub(crate) async fn flush(&mut self) -> Result<(), ReplicateError> {
        self.link.call(&[b"DEL", FRESHNESS_KEY.as_bytes()]).await?;
        tokio::time::sleep(2 * TRUSTED_FOR).await;
        self.link.call(&[b"FLUSHALL"]).await?;
        self.link.call(&[b"FUNCTION", b"FLUSH"]).await?;
        Ok(())
    }

    /// Writes `position` on its own (after a snapshot has loaded, and when the hold is over).
    pub(crate) async fn write_position(&mut self, position: &Position) -> Result<(), ReplicateError> {
        let mut request = Vec::new();
        let n = self.record(&mut request, position);
        self.exchange(&request, n, "SET").await
    }

    /// Sends `request` (`replies` commands) and requires every reply to be a success.
    pub(crate) async fn exchange(&mut self, request: &[u8], replies: usize, what: &str) -> Result<(), ReplicateError> {
        self.link.send(request).await?;
        for _ in 0..replies {
            self.expect_ok(what).await?;
        }
        Ok(())
    }

    /// Reads one reply that must not be an error.
    pub(crate) async fn expect_ok(&mut self, command: &str) -> Result<BytesFrame, ReplicateError> {
        match self.link.reply().await? {
            BytesFrame::Error(err) => Err(self.link.error(format!("`{command}` failed: {err}"))),
            reply => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_says_whether_expiries_are_held_and_older_records_still_read() {
        let position = Position { replid: "a".repeat(40), offset: 12, db: 3, held: true };
        assert_eq!(Position::decode(&position.encode()), Some(position.clone()));
        let before = format!("{} 12 3", "a".repeat(40));
        assert_eq!(Position::decode(&before), Some(Position { held: false, ..position }));
        assert_eq!(Position::decode(&format!("{before} other")), None);
    }
}
