//! Loading the snapshot into the target, in pipelined batches: string keys with `MSET` (or
//! `SET`), every other key as `RESTORE key <expiry> <payload> ABSTTL`, every function library as
//! `FUNCTION LOAD REPLACE`.
//!
//! Why strings differ. They are most of the keys of most datasets, and the target stores a
//! string from `MSET` for about half the work of a `RESTORE` (no payload to check and decode,
//! one command for a batch of keys); the target is what limits the load. The replace policy
//! is kept exactly:
//! - `Replace`: plain strings go in one `MSET` per batch and database, strings with an expiry
//!   as `SET key value PXAT <ms>`. Like `RESTORE … REPLACE`, both overwrite a key of any type
//!   and leave no older expiry behind. (`PXAT` needs Redis 6.2, as does the stream of a Redis 7
//!   source, which writes every relative expiry that way.)
//! - `Skip` and `Fail`: a key the target has must stay, and `MSETNX` sets all keys or none, so
//!   each string is its own `SET key value NX [PXAT <ms>]`; its nil reply is what `BUSYKEY` is
//!   to a `RESTORE`.
//!
//! Every expiry is written shifted by the expiry hold ([`super::hold`]), so no key of the
//! snapshot expires on the target before the stream says what the source did with it.
//!
//! A batch's `MSET` goes after its other commands, or before the next `SELECT`: a snapshot holds
//! each key once, so commands for different keys of one database commute.
//!
//! A value over the big-value threshold ([`super::rdb::Big`]) is written a piece at a time into
//! `eden:tmp:<key>` (`APPEND` for a string; `RPUSH`, `SADD`, `HSET`, `ZADD` of up to
//! [`ELEMENTS_PER_COMMAND`] elements for a collection; `XADD` per entry, then `XSETID`, groups,
//! consumers and pending entries for a stream), in the same pipelined batches, then
//! given its (held) expiry and renamed over the key: `RENAME` under `replace`, `RENAMENX` under
//! `skip` and `fail` (0 = the target has the key, as `BUSYKEY`; the temporary key is deleted).
//! No command carries more than a piece, so the target's `proto-max-bulk-len` never refuses
//! one, and memory holds the threshold plus a batch, whatever the value's size. Nothing reads
//! the temporary key, and the stream's commands for the key are applied only after the load,
//! so after its `RENAME` (see DESIGN.md, "Big values in pieces").
//!
//! Batches are bounded by keys and bytes, and up to [`IN_FLIGHT`] batches are sent before the
//! oldest one's replies are read, so the source's link, Eden and the target all work at once
//! and memory stays at a few batches. The replies of that many batches (a few bytes per
//! command) fit in the socket buffers, so not reading them yet cannot stall the target. A
//! payload the target refuses (an older server cannot read a newer RDB version) is rebuilt
//! with ordinary commands ([`super::decode`]), with one log line per value type.

use std::collections::VecDeque;
use std::time::Instant;

use redis_protocol::resp2::types::BytesFrame;

use super::Reporter;
use super::decode;
use super::hold;
use super::link::{Decimal, encode_bulk, encode_into, encode_len};
use super::rdb::{Big, CRC64, Entry, Feed, KeyEntry, Piece, Snapshot, kind};
use super::target::Target;
use crate::replicate::KeptKeys;
use crate::replicate::copy::{now_ms, redis_version};
use crate::replicate::endpoint::printable;
use crate::replicate::{ReplacePolicy, ReplicateError};

/// Batches sent whose replies are not read yet, at most. One round trip per batch would leave
/// the target idle while Eden parses the next batch, and Eden idle while the target restores.
const IN_FLIGHT: usize = 4;

/// Elements (a pair counts two) per command writing a big value's pieces, at most; a command
/// also closes once it holds [`COMMAND_BYTES`].
const ELEMENTS_PER_COMMAND: usize = 2000;
const COMMAND_BYTES: usize = 256 << 10;

/// Where a big value is built before it is renamed over its key (scan mode uses the same).
pub(crate) const TMP_PREFIX: &[u8] = b"eden:tmp:";

/// Limits for one pipelined batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub(crate) keys: usize,
    pub(crate) bytes: usize,
}

/// What each command in a batch was, to read its reply.
enum Sent {
    Select,
    Function,
    Restore(KeyEntry),
    /// An `MSET` of this many keys, or a `SET` of one, that overwrites.
    Set(usize),
    /// A `SET … NX` of this key of this database: nil when the target already has it.
    SetIfAbsent {
        db: u64,
        key: Vec<u8>,
    },
    /// A command building a big value of this key in its temporary key.
    Piece(Vec<u8>),
    /// The `RENAME` of a big value's temporary key over this key.
    Rename(Vec<u8>),
    /// The `RENAMENX` of a big value's temporary key over this key of this database: 0 when
    /// the target already has it.
    RenameIfAbsent {
        db: u64,
        key: Vec<u8>,
    },
}

struct Batch {
    /// The database the connection is in before the batch (a rebuild between batches returns
    /// to it).
    db: u64,
    request: Vec<u8>,
    sent: Vec<Sent>,
    /// Key/value pairs (encoded) of the `MSET` still to be written, and how many.
    pairs: Vec<u8>,
    pair_count: usize,
}

impl Batch {
    fn new(db: u64) -> Self {
        Batch { db, request: Vec::new(), sent: Vec::new(), pairs: Vec::new(), pair_count: 0 }
    }

    /// Writes the pending `MSET`, if any.
    fn close_mset(&mut self) {
        if self.pair_count == 0 {
            return;
        }
        encode_len(&mut self.request, b'*', 1 + 2 * self.pair_count);
        encode_bulk(&mut self.request, b"MSET");
        self.request.append(&mut self.pairs);
        self.sent.push(Sent::Set(self.pair_count));
        self.pair_count = 0;
    }
}

/// Loads one snapshot.
pub(crate) struct Loader<'a> {
    pub(crate) target: &'a mut Target,
    pub(crate) policy: ReplacePolicy,
    /// How the target's SET takes an expiry.
    pub(crate) set_expiry: SetExpiry,
    pub(crate) limits: BatchLimits,
    pub(crate) reporter: &'a mut Reporter,
    /// Value types already announced as rebuilt with commands.
    pub(crate) rebuilt_types: decode::Announced,
    /// When loading began: until it ends, that is how far behind the target is.
    pub(crate) started: Instant,
    /// Where the keys `skip` kept are recorded.
    pub(crate) kept: Option<&'a KeptKeys>,
    /// A key was written with its expiry shifted by the expiry hold.
    pub(crate) held: bool,
}

impl Loader<'_> {
    pub(crate) async fn run<F: Feed>(&mut self, snapshot: &mut Snapshot<'_, F>) -> Result<(), ReplicateError> {
        let version = snapshot.version();
        // Only what each batch sent stays in flight: its bytes are the socket's once written.
        let mut in_flight: VecDeque<Vec<Sent>> = VecDeque::with_capacity(IN_FLIGHT);
        loop {
            let (batch, ended) = self.collect(snapshot, version, &mut in_flight).await?;
            self.send(batch, &mut in_flight).await?;
            if ended {
                break;
            }
        }
        let db = self.target.db;
        self.rebuild_all(Vec::new(), &mut in_flight, db).await
    }

    /// Sends a batch, first settling the oldest one in flight when [`IN_FLIGHT`] are.
    async fn send(&mut self, mut batch: Batch, in_flight: &mut VecDeque<Vec<Sent>>) -> Result<(), ReplicateError> {
        batch.close_mset();
        if in_flight.len() == IN_FLIGHT
            && let Some(oldest) = in_flight.pop_front()
        {
            let refused = self.settle(oldest).await?;
            if !refused.is_empty() {
                self.rebuild_all(refused, in_flight, batch.db).await?;
            }
        }
        self.target.pace.spend(batch.sent.len()).await;
        self.target.link.send(&batch.request).await?;
        in_flight.push_back(batch.sent);
        Ok(())
    }

    /// Settles every batch still in flight, then rebuilds what the target refused: a rebuild's
    /// replies must not interleave with those of batches sent before it. The connection is
    /// left in `db`, the database the next batch starts in.
    async fn rebuild_all(
        &mut self,
        mut refused: Vec<KeyEntry>,
        in_flight: &mut VecDeque<Vec<Sent>>,
        db: u64,
    ) -> Result<(), ReplicateError> {
        while let Some(sent) = in_flight.pop_front() {
            refused.extend(self.settle(sent).await?);
        }
        for entry in refused {
            self.rebuild(entry, db).await?;
        }
        Ok(())
    }

    /// Reads entries until the batch is full or the snapshot ends.
    async fn collect<F: Feed>(
        &mut self,
        snapshot: &mut Snapshot<'_, F>,
        version: u16,
        in_flight: &mut VecDeque<Vec<Sent>>,
    ) -> Result<(Batch, bool), ReplicateError> {
        let mut batch = Batch::new(self.target.db);
        let mut keys = 0;
        let ended = loop {
            if keys >= self.limits.keys || batch.request.len() + batch.pairs.len() >= self.limits.bytes {
                break false;
            }
            match snapshot.next().await? {
                Entry::End => break true,
                Entry::DbSize(n) => self.reporter.progress.checkpoint.total += n,
                Entry::Function(code) => {
                    encode_into(&mut batch.request, &[b"FUNCTION", b"LOAD", b"REPLACE", &code]);
                    batch.sent.push(Sent::Function);
                }
                Entry::String(mut entry) => {
                    self.held |= entry.hold_expiry();
                    self.select(&mut batch, entry.db);
                    self.push_string(&mut batch, entry);
                    keys += 1;
                }
                Entry::Object(mut entry) => {
                    self.held |= entry.hold_expiry();
                    self.select(&mut batch, entry.db);
                    let payload = payload(&entry.value, version);
                    let expiry = Decimal::new(entry.expire_at_ms.unwrap_or(0));
                    let args: [&[u8]; 6] = [b"RESTORE", &entry.key, expiry.as_bytes(), &payload, b"ABSTTL", b"REPLACE"];
                    let replace = usize::from(self.policy == ReplacePolicy::Replace);
                    encode_into(&mut batch.request, &args[..5 + replace]);
                    batch.sent.push(Sent::Restore(entry));
                    keys += 1;
                }
                Entry::Big(mut big) => {
                    self.held |= big.entry.hold_expiry();
                    self.select(&mut batch, big.entry.db);
                    batch = self.write_big(snapshot, &mut big, batch, in_flight).await?;
                    keys += 1;
                }
            }
        };
        batch.close_mset();
        Ok((batch, ended))
    }

    /// Writes a big value piece by piece into its temporary key, sending each batch as it
    /// fills, then gives it its expiry and renames it over the key (see the module docs).
    /// Returns the batch to go on with.
    async fn write_big<F: Feed>(
        &mut self,
        snapshot: &mut Snapshot<'_, F>,
        big: &mut Big,
        mut batch: Batch,
        in_flight: &mut VecDeque<Vec<Sent>>,
    ) -> Result<Batch, ReplicateError> {
        let key = big.entry.key.clone();
        let tmp = [TMP_PREFIX, &key].concat();
        let piece = |batch: &mut Batch, args: &[&[u8]]| {
            encode_into(&mut batch.request, args);
            batch.sent.push(Sent::Piece(key.clone()));
        };
        piece(&mut batch, &[b"DEL", &tmp]);
        let command: &[u8] = if big.kind == kind::STRING { b"APPEND" } else { decode::collection_command(big.kind) };
        let (mut elements, mut bytes) = (Vec::new(), 0);
        loop {
            let next = big.next(snapshot).await?;
            let ended = next.is_none();
            let mut commands = Vec::new();
            match next {
                Some(Piece::Elements(piece)) => {
                    bytes += piece.iter().map(Vec::len).sum::<usize>();
                    elements.extend(piece);
                }
                Some(Piece::Commands(piece)) => commands = piece,
                None => {}
            }
            if !elements.is_empty() && (ended || elements.len() >= ELEMENTS_PER_COMMAND || bytes >= COMMAND_BYTES) {
                // A string's piece is one APPEND each: its pieces are never merged.
                for chunk in elements.chunks(if big.kind == kind::STRING { 1 } else { elements.len() }) {
                    piece(&mut batch, &decode::add_args(command, &tmp, chunk));
                }
                (elements, bytes) = (Vec::new(), 0);
            }
            for (words, args) in &commands {
                let mut command: Vec<&[u8]> = words.to_vec();
                command.push(&tmp);
                command.extend(args.iter().map(Vec::as_slice));
                piece(&mut batch, &command);
            }
            if ended {
                break;
            }
            if batch.request.len() >= self.limits.bytes {
                let full = std::mem::replace(&mut batch, Batch::new(self.target.db));
                self.send(full, in_flight).await?;
            }
        }
        if let Some(at) = big.entry.expire_at_ms {
            piece(&mut batch, &[b"PEXPIREAT", &tmp, Decimal::new(at).as_bytes()]);
        }
        if self.policy == ReplacePolicy::Replace {
            encode_into(&mut batch.request, &[b"RENAME", &tmp, &key]);
            batch.sent.push(Sent::Rename(key));
        } else {
            encode_into(&mut batch.request, &[b"RENAMENX", &tmp, &key]);
            batch.sent.push(Sent::RenameIfAbsent { db: big.entry.db, key: key.clone() });
            piece(&mut batch, &[b"DEL", &tmp]);
        }
        Ok(batch)
    }

    /// Switches the batch to `db`; the strings gathered for the `MSET` go first, to the
    /// database they belong to.
    fn select(&mut self, batch: &mut Batch, db: u64) {
        if db != self.target.db {
            batch.close_mset();
        }
        if self.target.select(&mut batch.request, db) == 1 {
            batch.sent.push(Sent::Select);
        }
    }

    /// Adds a string key to the batch: to its `MSET`, or as a `SET` of its own.
    fn push_string(&mut self, batch: &mut Batch, entry: KeyEntry) {
        let replace = self.policy == ReplacePolicy::Replace;
        if replace && entry.expire_at_ms.is_none() {
            encode_bulk(&mut batch.pairs, &entry.key);
            encode_bulk(&mut batch.pairs, &entry.value);
            batch.pair_count += 1;
            return;
        }
        encode_set(&mut batch.request, &entry.key, &entry.value, entry.expire_at_ms, self.policy, self.set_expiry);
        batch.sent.push(if replace { Sent::Set(1) } else { Sent::SetIfAbsent { db: entry.db, key: entry.key } });
    }

    /// Reads a batch's replies in order; returns the keys the target could not RESTORE.
    async fn settle(&mut self, batch: Vec<Sent>) -> Result<Vec<KeyEntry>, ReplicateError> {
        let mut refused = Vec::new();
        for sent in batch {
            let reply = self.target.link.reply().await?;
            let error = match (reply, &sent) {
                (BytesFrame::Error(err), _) => err.to_string(),
                (BytesFrame::Null, Sent::SetIfAbsent { db, key })
                | (BytesFrame::Integer(0), Sent::RenameIfAbsent { db, key }) => {
                    self.exists(*db, key)?;
                    continue;
                }
                (_, sent) => {
                    self.reporter.progress.checkpoint.copied += match sent {
                        Sent::Set(keys) => *keys as u64,
                        Sent::Restore(_) | Sent::SetIfAbsent { .. } | Sent::Rename(_) | Sent::RenameIfAbsent { .. } => {
                            1
                        }
                        Sent::Select | Sent::Function | Sent::Piece(_) => 0,
                    };
                    continue;
                }
            };
            match sent {
                Sent::Restore(entry) if error.starts_with("BUSYKEY") => self.exists(entry.db, &entry.key)?,
                Sent::Restore(entry) if decode::unreadable_payload(&error) => refused.push(entry),
                Sent::Restore(entry) => {
                    let key = printable(&entry.key);
                    return Err(self.target.link.error(format!("RESTORE of key {key} failed: {error}")));
                }
                Sent::SetIfAbsent { key, .. } => {
                    let key = printable(&key);
                    return Err(self.target.link.error(format!("SET of key {key} failed: {error}")));
                }
                Sent::Piece(key) | Sent::Rename(key) | Sent::RenameIfAbsent { key, .. } => {
                    let key = printable(&key);
                    return Err(self.target.link.error(format!("writing big key {key} in pieces failed: {error}")));
                }
                Sent::Set(keys) => {
                    return Err(self.target.link.error(format!("setting {keys} string keys failed: {error}")));
                }
                Sent::Function => return Err(self.target.link.error(format!("FUNCTION LOAD failed: {error}"))),
                Sent::Select => return Err(self.target.link.error(format!("SELECT failed: {error}"))),
            }
        }
        self.reporter.progress.lag_ms = self.started.elapsed().as_millis() as u64;
        self.reporter.publish();
        Ok(refused)
    }

    /// The target already has `key` in database `db` (and the policy is not to replace it).
    fn exists(&mut self, db: u64, key: &[u8]) -> Result<(), ReplicateError> {
        if self.policy == ReplacePolicy::Fail {
            return Err(ReplicateError::TargetKeyExists {
                server: self.target.link.label().clone(),
                key: printable(key),
            });
        }
        self.reporter.progress.checkpoint.skipped += 1;
        if let Some(kept) = self.kept {
            kept.insert(db, key);
        }
        Ok(())
    }

    /// Recreates a key the target could not RESTORE from its decoded value.
    async fn rebuild(&mut self, entry: KeyEntry, end_db: u64) -> Result<(), ReplicateError> {
        self.rebuilt_types.rebuilding(&entry.key, &entry.value);
        let commands = decode::commands(&entry.key, &entry.value, entry.expire_at_ms)
            .await
            .map_err(|err| decode::unrebuildable(self.target.link.label(), &entry.key, err))?;
        let mut request = Vec::new();
        encode_into(&mut request, &[b"SELECT", entry.db.to_string().as_bytes()]);
        if self.policy == ReplacePolicy::Replace {
            encode_into(&mut request, &[b"DEL", &entry.key]);
        }
        for args in &commands {
            encode_into(&mut request, &args.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }
        encode_into(&mut request, &[b"SELECT", end_db.to_string().as_bytes()]);
        let replies = commands.len() + 2 + usize::from(self.policy == ReplacePolicy::Replace);
        self.target.exchange(&request, replies, "rebuilding a refused value").await?;
        self.reporter.progress.checkpoint.copied += 1;
        Ok(())
    }
}

impl KeyEntry {
    /// Shifts the key's expiry for the expiry hold; whether it has one.
    fn hold_expiry(&mut self) -> bool {
        self.expire_at_ms = self.expire_at_ms.map(hold::held);
        self.expire_at_ms.is_some()
    }
}

/// How the target's SET takes an expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetExpiry {
    /// `PXAT` with the absolute time (Redis 6.2 and newer).
    At,
    /// `PX` with the time left as Eden's clock sees it, for older targets; a time already up
    /// leaves 1 ms, so the key expires there as it did on the source.
    Left,
}

impl SetExpiry {
    /// From the target's `INFO server`.
    pub(crate) fn for_target(info: &str) -> Self {
        if redis_version(info) >= (6, 2) { SetExpiry::At } else { SetExpiry::Left }
    }
}

/// Appends `SET key value [PXAT|PX <ms>] [NX]`, the one-key string write of both modes (see the
/// module docs): under `Replace` it overwrites a key of any type and leaves no older expiry
/// behind, as `RESTORE … REPLACE` does; under `Skip` and `Fail` its `NX` makes a nil reply mean
/// that the target already has the key, what `BUSYKEY` is to a `RESTORE`.
pub(crate) fn encode_set(
    out: &mut Vec<u8>,
    key: &[u8],
    value: &[u8],
    expire_at_ms: Option<u64>,
    policy: ReplacePolicy,
    how: SetExpiry,
) {
    let (unit, time): (&[u8], _) = match how {
        SetExpiry::At => (b"PXAT", expire_at_ms.map(Decimal::new)),
        SetExpiry::Left => (b"PX", expire_at_ms.map(|at| Decimal::new(at.saturating_sub(now_ms()).max(1)))),
    };
    let mut args: [&[u8]; 6] = [b"SET", key, value, unit, b"", b"NX"];
    let mut len = 3;
    if let Some(time) = &time {
        args[4] = time.as_bytes();
        len = 5;
    }
    if policy != ReplacePolicy::Replace {
        args[len] = b"NX";
        len += 1;
    }
    encode_into(out, &args[..len]);
}

/// A DUMP payload: the value's encoding, the RDB version (2 bytes) and a CRC64 of both (8
/// bytes), little-endian, as `DUMP` produces and `RESTORE` checks.
pub(crate) fn payload(object: &[u8], version: u16) -> Vec<u8> {
    let mut payload = Vec::with_capacity(object.len() + 10);
    payload.extend_from_slice(object);
    payload.extend_from_slice(&version.to_le_bytes());
    let crc = CRC64.checksum(&payload);
    payload.extend_from_slice(&crc.to_le_bytes());
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(expire_at_ms: Option<u64>, policy: ReplacePolicy, how: SetExpiry) -> String {
        let mut out = Vec::new();
        encode_set(&mut out, b"k", b"v", expire_at_ms, policy, how);
        String::from_utf8(out)
            .unwrap()
            .split("\r\n")
            .filter(|part| !part.is_empty() && !part.starts_with(['*', '$']))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn targets_before_6_2_get_the_time_left_instead_of_pxat() {
        let info = |version: &str| format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n");
        assert_eq!(SetExpiry::for_target(&info("7.0.15")), SetExpiry::At);
        assert_eq!(SetExpiry::for_target(&info("6.2.0")), SetExpiry::At);
        assert_eq!(SetExpiry::for_target(&info("6.0.20")), SetExpiry::Left);
        assert_eq!(SetExpiry::for_target(&info("5.0.7")), SetExpiry::Left);
        assert_eq!(SetExpiry::for_target("# Server\r\n"), SetExpiry::Left, "unknown: the form every server takes");

        assert_eq!(set(Some(1_234), ReplacePolicy::Replace, SetExpiry::At), "SET k v PXAT 1234");
        assert_eq!(set(None, ReplacePolicy::Skip, SetExpiry::At), "SET k v NX");
        let in_a_minute = now_ms() + 60_000;
        let left = set(Some(in_a_minute), ReplacePolicy::Skip, SetExpiry::Left);
        let ms: u64 =
            left.strip_prefix("SET k v PX ").and_then(|rest| rest.strip_suffix(" NX")).unwrap().parse().unwrap();
        assert!((59_000..=60_000).contains(&ms), "{left}");
        assert_eq!(set(Some(1), ReplacePolicy::Replace, SetExpiry::Left), "SET k v PX 1", "a time already up");
    }
}
