//! Loading the snapshot into the target: every key as `RESTORE key <expiry> <payload> ABSTTL`,
//! every function library as `FUNCTION LOAD REPLACE`, in pipelined batches.
//!
//! Batches are bounded by keys and bytes, and up to [`IN_FLIGHT`] batches are sent before the
//! oldest one's replies are read, so the source's link, Eden and the target all work at once
//! and memory stays at a few batches. The replies of that many batches (a few bytes per key)
//! fit in the socket buffers, so not reading them yet cannot stall the target. A payload the target refuses (an older server cannot read a newer RDB version)
//! is rebuilt with ordinary commands ([`super::decode`]), with one log line per value type.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use redis_protocol::resp2::types::BytesFrame;
use tracing::warn;

use super::Reporter;
use super::decode;
use super::link::encode_into;
use super::rdb::{CRC64, Entry, Feed, KeyEntry, Snapshot};
use super::target::Target;
use crate::replicate::endpoint::printable;
use crate::replicate::{ReplacePolicy, ReplicateError};

/// Batches sent whose replies are not read yet, at most. One round trip per batch would leave
/// the target idle while Eden parses the next batch, and Eden idle while the target restores.
const IN_FLIGHT: usize = 4;

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
}

struct Batch {
    request: Vec<u8>,
    sent: Vec<Sent>,
}

/// Loads one snapshot.
pub(crate) struct Loader<'a> {
    pub(crate) target: &'a mut Target,
    pub(crate) policy: ReplacePolicy,
    pub(crate) limits: BatchLimits,
    pub(crate) reporter: &'a mut Reporter,
    /// Value types already announced as rebuilt with commands.
    pub(crate) rebuilt_types: HashSet<u8>,
    /// When loading began: until it ends, that is how far behind the target is.
    pub(crate) started: Instant,
}

impl Loader<'_> {
    pub(crate) async fn run<F: Feed>(&mut self, snapshot: &mut Snapshot<'_, F>) -> Result<(), ReplicateError> {
        let version = snapshot.version();
        let mut in_flight: VecDeque<Batch> = VecDeque::with_capacity(IN_FLIGHT);
        loop {
            let (batch, ended) = self.collect(snapshot, version).await?;
            if in_flight.len() == IN_FLIGHT
                && let Some(oldest) = in_flight.pop_front()
            {
                let refused = self.settle(oldest).await?;
                if !refused.is_empty() {
                    self.rebuild_all(refused, &mut in_flight).await?;
                }
            }
            self.target.pace.spend(batch.sent.len()).await;
            self.target.link.send(&batch.request).await?;
            in_flight.push_back(batch);
            if ended {
                break;
            }
        }
        self.rebuild_all(Vec::new(), &mut in_flight).await
    }

    /// Settles every batch still in flight, then rebuilds what the target refused: a rebuild's
    /// replies must not interleave with those of batches sent before it.
    async fn rebuild_all(
        &mut self,
        mut refused: Vec<KeyEntry>,
        in_flight: &mut VecDeque<Batch>,
    ) -> Result<(), ReplicateError> {
        while let Some(batch) = in_flight.pop_front() {
            refused.extend(self.settle(batch).await?);
        }
        // The connection is now in the database the last batch left selected.
        let end_db = self.target.db;
        for entry in refused {
            self.rebuild(entry, end_db).await?;
        }
        Ok(())
    }

    /// Reads entries until the batch is full or the snapshot ends.
    async fn collect<F: Feed>(
        &mut self,
        snapshot: &mut Snapshot<'_, F>,
        version: u16,
    ) -> Result<(Batch, bool), ReplicateError> {
        let mut batch = Batch { request: Vec::new(), sent: Vec::new() };
        let mut keys = 0;
        let ended = loop {
            if keys >= self.limits.keys || batch.request.len() >= self.limits.bytes {
                break false;
            }
            match snapshot.next().await? {
                Entry::End => break true,
                Entry::DbSize(n) => self.reporter.progress.checkpoint.total += n,
                Entry::Function(code) => {
                    encode_into(&mut batch.request, &[b"FUNCTION", b"LOAD", b"REPLACE", &code]);
                    batch.sent.push(Sent::Function);
                }
                Entry::Key(entry) => {
                    if self.target.select(&mut batch.request, entry.db) == 1 {
                        batch.sent.push(Sent::Select);
                    }
                    let payload = payload(&entry.object, version);
                    let expiry = entry.expire_at_ms.unwrap_or(0).to_string();
                    let mut args: Vec<&[u8]> = vec![b"RESTORE", &entry.key, expiry.as_bytes(), &payload, b"ABSTTL"];
                    if self.policy == ReplacePolicy::Replace {
                        args.push(b"REPLACE");
                    }
                    encode_into(&mut batch.request, &args);
                    batch.sent.push(Sent::Restore(entry));
                    keys += 1;
                }
            }
        };
        Ok((batch, ended))
    }

    /// Reads a batch's replies in order; returns the keys the target could not RESTORE.
    async fn settle(&mut self, batch: Batch) -> Result<Vec<KeyEntry>, ReplicateError> {
        let mut refused = Vec::new();
        for sent in batch.sent {
            let reply = self.target.link.reply().await?;
            let error = match reply {
                BytesFrame::Error(err) => err.to_string(),
                _ => {
                    if matches!(sent, Sent::Restore(_)) {
                        self.reporter.progress.checkpoint.copied += 1;
                    }
                    continue;
                }
            };
            match sent {
                Sent::Restore(entry) if error.starts_with("BUSYKEY") => match self.policy {
                    ReplacePolicy::Fail => {
                        return Err(ReplicateError::TargetKeyExists {
                            server: self.target.link.label().clone(),
                            key: printable(&entry.key),
                        });
                    }
                    _ => self.reporter.progress.checkpoint.skipped += 1,
                },
                Sent::Restore(entry) if decode::unreadable_payload(&error) => refused.push(entry),
                Sent::Restore(entry) => {
                    let key = printable(&entry.key);
                    return Err(self.target.link.error(format!("RESTORE of key {key} failed: {error}")));
                }
                Sent::Function => return Err(self.target.link.error(format!("FUNCTION LOAD failed: {error}"))),
                Sent::Select => return Err(self.target.link.error(format!("SELECT failed: {error}"))),
            }
        }
        self.reporter.progress.lag_ms = self.started.elapsed().as_millis() as u64;
        self.reporter.publish();
        Ok(refused)
    }

    /// Recreates a key the target could not RESTORE from its decoded value.
    async fn rebuild(&mut self, entry: KeyEntry, end_db: u64) -> Result<(), ReplicateError> {
        let value_type = entry.object.first().copied().unwrap_or_default();
        if self.rebuilt_types.insert(value_type) {
            warn!(
                value_type,
                key = %printable(&entry.key),
                "the target cannot read this server's DUMP payloads for this value type (it is probably an older \
                 Redis); rebuilding such keys with ordinary commands"
            );
        }
        let commands = decode::commands(&entry.key, &entry.object, entry.expire_at_ms)
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
