//! Copying a batch of keys from the source to the target: DUMP + expiry in one MULTI on the
//! source, RESTORE ... ABSTTL (or DEL for keys that are gone) in one pipeline on the target.
//!
//! Expiries travel as absolute Unix milliseconds (PEXPIRETIME on Redis ≥ 7, else PTTL converted
//! when the reply arrives), so time spent in transit never extends a TTL. Values bigger than the
//! threshold are walked in chunks ([`super::chunks`]) into a temporary key on the target that is
//! then RENAMEd over the real one, so memory stays bounded and readers never see half a value.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use redis::{Value, cmd, pipe};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::chunks::{Chunk, Chunks};
use super::endpoint::{Endpoint, as_int, printable};
use super::keys::{self, KeyInfo};
use super::sync::decode;
use super::{Key, KeyType, ReplicateError, streams};

/// What to do when a key the backfill is about to write already exists on the target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplacePolicy {
    /// Overwrite it with the source's value.
    #[default]
    Replace,
    /// Keep the target's value and count the key as skipped.
    Skip,
    /// Stop replication with an error naming the key.
    Fail,
}

/// How this source reports expiries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ExpiryCommand {
    /// PEXPIRETIME (Redis ≥ 7): absolute already.
    ExpireTime,
    /// PTTL (older servers): relative, converted on arrival.
    Ttl,
}

impl ExpiryCommand {
    /// Picks PEXPIRETIME when the source's `redis_version` is 7 or newer.
    pub(crate) async fn detect(source: &Endpoint) -> Result<Self, ReplicateError> {
        let info: String = source.cmd("INFO", cmd("INFO").arg("server")).await?;
        let major = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .and_then(|v| v.split('.').next()?.trim().parse::<u32>().ok())
            .unwrap_or(0);
        Ok(if major >= 7 { ExpiryCommand::ExpireTime } else { ExpiryCommand::Ttl })
    }

    fn name(self) -> &'static str {
        match self {
            ExpiryCommand::ExpireTime => "PEXPIRETIME",
            ExpiryCommand::Ttl => "PTTL",
        }
    }

    /// RESTORE's ABSTTL argument from the reply: 0 for no expiry.
    fn absolute_ms(self, reply: i64) -> u64 {
        match (self, reply) {
            (_, r) if r < 0 => 0,
            (ExpiryCommand::ExpireTime, at) => at as u64,
            (ExpiryCommand::Ttl, ttl) => now_ms() + ttl as u64,
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Counts from copying one batch.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CopyStats {
    pub(crate) copied: u64,
    pub(crate) deleted: u64,
    pub(crate) skipped: u64,
}

impl std::ops::AddAssign for CopyStats {
    fn add_assign(&mut self, other: Self) {
        self.copied += other.copied;
        self.deleted += other.deleted;
        self.skipped += other.skipped;
    }
}

/// Copies keys from one server to another.
pub(crate) struct Copier {
    pub(crate) source: Endpoint,
    pub(crate) target: Endpoint,
    pub(crate) expiry: ExpiryCommand,
    /// MEMORY USAGE above which a collection is copied in chunks.
    pub(crate) big_key_bytes: u64,
    /// Elements per chunk for big keys.
    pub(crate) chunk: usize,
    /// Value types already announced as rebuilt with commands.
    pub(crate) rebuilt_types: Mutex<HashSet<u8>>,
}

impl Copier {
    /// Makes the target's copy of each key equal to the source's value as of this call (or
    /// deletes it when the source no longer has the key).
    pub(crate) async fn copy(&self, keys: &[Key], policy: ReplacePolicy) -> Result<CopyStats, ReplicateError> {
        let infos = keys::inspect(&self.source, keys).await?;
        let (big, small): (Vec<_>, Vec<_>) =
            keys.iter().zip(infos).partition(|(_, info)| info.is_big(self.big_key_bytes));
        let mut stats = self.copy_small(&small.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), policy).await?;
        for (key, info) in big {
            stats += self.copy_big(key, info, policy).await?;
        }
        Ok(stats)
    }

    async fn copy_small(&self, keys: &[&Key], policy: ReplacePolicy) -> Result<CopyStats, ReplicateError> {
        let mut stats = CopyStats::default();
        // One MULTI so each key's payload and expiry describe the same moment.
        let mut read = pipe();
        read.atomic();
        for key in keys {
            read.cmd("DUMP").arg(*key).cmd(self.expiry.name()).arg(*key);
        }
        let replies = self.source.pipe("DUMP", &mut read).await?;
        let mut write = pipe();
        for (key, pair) in keys.iter().zip(replies.chunks(2)) {
            match &pair[0] {
                Value::Nil => write.cmd("DEL").arg(*key),
                Value::BulkString(payload) => {
                    let expiry =
                        as_int(&pair[1]).ok_or_else(|| self.source.unexpected(self.expiry.name(), &pair[1]))?;
                    let restore = write.cmd("RESTORE").arg(*key).arg(self.expiry.absolute_ms(expiry)).arg(payload);
                    if policy == ReplacePolicy::Replace {
                        restore.arg("REPLACE");
                    }
                    restore.arg("ABSTTL")
                }
                other => return Err(self.source.unexpected("DUMP", other)),
            };
        }
        let results = self.target.pipe("RESTORE", &mut write).await?;
        for ((key, pair), result) in keys.iter().zip(replies.chunks(2)).zip(results) {
            match result {
                Value::ServerError(err) if err.code() == "BUSYKEY" => self.busy(key, policy, &mut stats)?,
                Value::ServerError(err) if decode::unreadable_payload(&err.to_string()) => {
                    let (Value::BulkString(payload), Some(expiry)) = (&pair[0], as_int(&pair[1])) else {
                        return Err(self.target.error("RESTORE", err.into()));
                    };
                    stats += self.rebuild(key, payload, self.expiry.absolute_ms(expiry), policy).await?;
                }
                Value::ServerError(err) => return Err(self.target.error("RESTORE", err.into())),
                _ if pair[0] == Value::Nil => stats.deleted += 1,
                _ => stats.copied += 1,
            }
        }
        Ok(stats)
    }

    /// The target cannot read the source's DUMP payload (it is an older Redis): recreates the
    /// value from its decoded form with ordinary commands, in one MULTI with the DEL of the old
    /// value, so readers never see it half built. Logged once per value type.
    async fn rebuild(
        &self,
        key: &[u8],
        payload: &[u8],
        expire_at_ms: u64,
        policy: ReplacePolicy,
    ) -> Result<CopyStats, ReplicateError> {
        let mut stats = CopyStats::default();
        if policy != ReplacePolicy::Replace && keys::exists(&self.target, &[key.to_vec()]).await?[0] {
            self.busy(key, policy, &mut stats)?;
            return Ok(stats);
        }
        let object = decode::dumped_object(payload);
        let value_type = object.first().copied().unwrap_or_default();
        if self.rebuilt_types.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(value_type) {
            warn!(
                value_type,
                key = %printable(key),
                "the target cannot read this server's DUMP payloads for this value type (it is probably an older \
                 Redis); rebuilding such keys with ordinary commands"
            );
        }
        let commands = decode::commands(key, object, (expire_at_ms > 0).then_some(expire_at_ms))
            .await
            .map_err(|err| decode::unrebuildable(self.target.label(), key, err))?;
        let mut rebuild = pipe();
        rebuild.atomic().cmd("DEL").arg(key);
        for args in &commands {
            let mut command = cmd(&String::from_utf8_lossy(&args[0]));
            command.arg(&args[1..]);
            rebuild.add_command(command);
        }
        for reply in self.target.pipe("rebuilding a refused value", &mut rebuild).await? {
            self.target.ok("rebuilding a refused value", reply)?;
        }
        stats.copied += 1;
        Ok(stats)
    }

    fn busy(&self, key: &[u8], policy: ReplacePolicy, stats: &mut CopyStats) -> Result<(), ReplicateError> {
        match policy {
            ReplacePolicy::Fail => {
                Err(ReplicateError::TargetKeyExists { server: self.target.label().clone(), key: printable(key) })
            }
            _ => {
                stats.skipped += 1;
                Ok(())
            }
        }
    }

    /// Walks a big collection into `eden:tmp:<key>` on the target, then atomically sets the
    /// expiry and RENAMEs it over the key.
    async fn copy_big(&self, key: &[u8], info: KeyInfo, policy: ReplacePolicy) -> Result<CopyStats, ReplicateError> {
        let mut stats = CopyStats::default();
        let kind = info.kind.unwrap_or(KeyType::Other);
        if policy != ReplacePolicy::Replace && keys::exists(&self.target, &[key.to_vec()]).await?[0] {
            self.busy(key, policy, &mut stats)?;
            return Ok(stats);
        }
        let expiry: i64 = self.source.cmd(self.expiry.name(), cmd(self.expiry.name()).arg(key)).await?;
        let expiry = self.expiry.absolute_ms(expiry);
        let tmp = [b"eden:tmp:".as_slice(), key].concat();
        self.target.cmd::<()>("DEL", cmd("DEL").arg(&tmp)).await?;
        let mut chunks = Chunks::new(&self.source, key, kind, self.chunk);
        let mut wrote = false;
        while let Some(chunk) = chunks.next().await? {
            let mut write = match chunk {
                Chunk::Flat(items) if items.is_empty() => continue,
                Chunk::Flat(items) => {
                    let mut write = pipe();
                    write.add_command(flat_write(kind, &tmp, &items));
                    write
                }
                Chunk::Stream(entries) => streams::entries(&self.source, &tmp, &entries)?,
            };
            for reply in self.target.pipe("chunk write", &mut write).await? {
                self.target.ok("chunk write", reply)?;
            }
            wrote = true;
        }
        if !wrote {
            // The key vanished before its first chunk; a notification will confirm the delete.
            self.target.cmd::<()>("DEL", cmd("DEL").arg(key)).await?;
            stats.deleted += 1;
            return Ok(stats);
        }
        if kind == KeyType::Stream {
            streams::copy_state(&self.source, &self.target, key, &tmp, self.chunk).await?;
        }
        let mut finish = pipe();
        finish.atomic();
        if expiry > 0 {
            finish.cmd("PEXPIREAT").arg(&tmp).arg(expiry);
        }
        finish.cmd("RENAME").arg(&tmp).arg(key);
        for reply in self.target.pipe("PEXPIREAT/RENAME", &mut finish).await? {
            self.target.ok("RENAME", reply)?;
        }
        stats.copied += 1;
        Ok(stats)
    }
}

/// The command adding one chunk of a list, hash, set or sorted set to `key`.
fn flat_write(kind: KeyType, key: &[u8], items: &[Key]) -> redis::Cmd {
    let mut write = match kind {
        KeyType::Hash => cmd("HSET"),
        KeyType::Set => cmd("SADD"),
        KeyType::ZSet => cmd("ZADD"),
        _ => cmd("RPUSH"),
    };
    write.arg(key);
    if kind == KeyType::ZSet {
        // ZSCAN yields member, score; ZADD takes score, member.
        for pair in items.chunks(2) {
            write.arg(&pair[1]).arg(&pair[0]);
        }
    } else {
        write.arg(items);
    }
    write
}
