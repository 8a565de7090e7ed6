//! Bounded-memory iteration over one value: HSCAN, SSCAN, ZSCAN, LRANGE windows, XRANGE
//! windows, GETRANGE windows of a string.
//!
//! A value with a million elements is never held whole: the copier writes each chunk to the
//! target as it arrives and the comparer checks each chunk against the other server. The SCAN
//! family may return an element twice and may miss elements added during the walk; both callers
//! are safe with that (writes are idempotent, and a key changed during a walk is notified and
//! copied again).

use redis::{Value, cmd};

use super::endpoint::{Endpoint, as_bytes};
use super::sync::STRING_PIECE;
use super::{Key, KeyType};

/// Where the walk stands.
enum Position {
    Cursor(u64),
    Index(i64),
    /// The exclusive lower bound of the next XRANGE window (`-` at the start).
    StreamAfter(String),
    Done,
}

/// Reads one key's elements a chunk at a time.
pub(crate) struct Chunks<'a> {
    ep: &'a Endpoint,
    key: &'a [u8],
    kind: KeyType,
    size: usize,
    position: Position,
}

/// One chunk. Hashes and sorted sets are flat `field, value` / `member, score` pairs; sets and
/// lists are plain elements; a string's chunk is one element, its next bytes; a stream chunk is
/// the raw XRANGE entries.
pub(crate) enum Chunk {
    Flat(Vec<Key>),
    Stream(Vec<Value>),
}

impl<'a> Chunks<'a> {
    /// A walk of `size` elements a chunk (a string's: [`STRING_PIECE`] bytes).
    pub(crate) fn new(ep: &'a Endpoint, key: &'a [u8], kind: KeyType, size: usize) -> Self {
        let position = match kind {
            KeyType::Hash | KeyType::Set | KeyType::ZSet => Position::Cursor(0),
            KeyType::List | KeyType::String => Position::Index(0),
            KeyType::Stream => Position::StreamAfter("-".into()),
            KeyType::Other => Position::Done,
        };
        let size = if kind == KeyType::String { STRING_PIECE } else { size };
        Chunks { ep, key, kind, size, position }
    }

    /// The next chunk, or `None` when the walk is over. Chunks may be empty mid-walk (a SCAN step
    /// that found nothing); only `None` ends it.
    pub(crate) async fn next(&mut self) -> Result<Option<Chunk>, super::ReplicateError> {
        let size = self.size;
        match self.position {
            Position::Done => Ok(None),
            Position::Cursor(cursor) => {
                let command = match self.kind {
                    KeyType::Hash => "HSCAN",
                    KeyType::Set => "SSCAN",
                    _ => "ZSCAN",
                };
                let (next, items): (u64, Vec<Key>) =
                    self.ep.cmd(command, cmd(command).arg(self.key).arg(cursor).arg("COUNT").arg(size)).await?;
                self.position = if next == 0 { Position::Done } else { Position::Cursor(next) };
                Ok(Some(Chunk::Flat(items)))
            }
            Position::Index(start) => {
                let stop = start + size as i64 - 1;
                // A window of a list's elements, or of a string's bytes.
                let (items, got): (Vec<Key>, usize) = if self.kind == KeyType::String {
                    let bytes: Key =
                        self.ep.cmd("GETRANGE", cmd("GETRANGE").arg(self.key).arg(start).arg(stop)).await?;
                    let got = bytes.len();
                    ((got > 0).then_some(bytes).into_iter().collect(), got)
                } else {
                    let items: Vec<Key> =
                        self.ep.cmd("LRANGE", cmd("LRANGE").arg(self.key).arg(start).arg(stop)).await?;
                    let got = items.len();
                    (items, got)
                };
                self.position = if got < size { Position::Done } else { Position::Index(stop + 1) };
                Ok((!items.is_empty()).then_some(Chunk::Flat(items)))
            }
            Position::StreamAfter(ref after) => {
                let entries: Vec<Value> = self
                    .ep
                    .cmd("XRANGE", cmd("XRANGE").arg(self.key).arg(after).arg("+").arg("COUNT").arg(size))
                    .await?;
                let last_id = entries.last().and_then(entry_id);
                self.position = match last_id {
                    Some(id) if entries.len() == size => Position::StreamAfter(format!("({id}")),
                    _ => Position::Done,
                };
                Ok((!entries.is_empty()).then_some(Chunk::Stream(entries)))
            }
        }
    }
}

/// The ID of one XRANGE entry (`[id, [field, value, ...]]`).
fn entry_id(entry: &Value) -> Option<String> {
    match entry {
        Value::Array(parts) => parts.first().and_then(as_bytes).map(|id| String::from_utf8_lossy(id).into_owned()),
        _ => None,
    }
}
