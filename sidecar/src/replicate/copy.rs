//! Copying a batch of keys from the source to the target: each value and its expiry read in a
//! MULTI on the source ([`Copier::read`]), then written in a pipeline on the target
//! ([`Copier::write`]); the replicator overlaps these steps across batches ([`super::scan`]).
//! What a batch holds is bounded by its byte budget ([`super::budget`]): the MULTIs and the
//! pipelines are split to fit it.
//!
//! Why strings differ. They are most keys of most datasets, and DUMP, RESTORE and MEMORY USAGE
//! are the costliest commands of a copy, for both servers. So every key is first read as a
//! string, with GETRANGE (bounded by the key's share of the batch's budget), and a string is
//! written with `SET key value [PXAT <ms>] [NX]`, the same command sync mode loads strings with
//! (the replace policy is kept the same way: see [`super::sync::load`]); every other value, and
//! a string longer than the cap, moves as a DUMP payload restored with `RESTORE … ABSTTL`. A key
//! gone from the source is deleted on the target. (`PXAT` needs a Redis 6.2 target, as in sync
//! mode.)
//!
//! Expiries travel as absolute Unix milliseconds (PEXPIRETIME on Redis ≥ 7, else PTTL converted
//! when the reply arrives), so time spent in transit never extends a TTL. Values bigger than the
//! threshold are walked in chunks ([`super::chunks`]) into a temporary key on the target that is
//! then RENAMEd over the real one, so memory stays bounded and readers never see half a value.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::{cmd, pipe};
use redis_protocol::resp2::types::BytesFrame;
use serde::{Deserialize, Serialize};

use super::budget;
use super::chunks::{Chunk, Chunks};
use super::endpoint::{Endpoint, printable};
use super::keys;
use super::sync::decode;
use super::sync::link::{Decimal, Link, encode_into};
use super::sync::load::{SetExpiry, TMP_PREFIX, encode_set};
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
        Ok(if redis_version(&info) >= (7, 0) { ExpiryCommand::ExpireTime } else { ExpiryCommand::Ttl })
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

/// `redis_version` from an `INFO server` reply as (major, minor); (0, 0) when it is missing.
pub(crate) fn redis_version(info: &str) -> (u32, u32) {
    let version = info.lines().find_map(|line| line.strip_prefix("redis_version:")).unwrap_or_default();
    let mut parts = version.trim().split('.').map(|part| part.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Counts from copying one batch.
#[derive(Debug, Default, Clone)]
pub(crate) struct CopyStats {
    pub(crate) copied: u64,
    pub(crate) deleted: u64,
    pub(crate) skipped: u64,
    /// The keys skipped: the target had them, and `skip` kept its value.
    pub(crate) kept: Vec<Key>,
}

impl std::ops::AddAssign for CopyStats {
    fn add_assign(&mut self, other: Self) {
        self.copied += other.copied;
        self.deleted += other.deleted;
        self.skipped += other.skipped;
        self.kept.extend(other.kept);
    }
}

/// Copies keys from one server to another.
pub(crate) struct Copier {
    pub(crate) source: Endpoint,
    pub(crate) target: Endpoint,
    pub(crate) expiry: ExpiryCommand,
    /// How the target's SET takes an expiry.
    pub(crate) set_expiry: SetExpiry,
    /// Size (MEMORY USAGE) above which a collection is copied in chunks.
    pub(crate) big_key_bytes: u64,
    /// Value bytes one batch's reads may hold at a time ([`super::budget`]).
    pub(crate) batch_bytes: u64,
    /// Elements per chunk for big keys.
    pub(crate) chunk: usize,
    /// Value types already announced as rebuilt with commands.
    pub(crate) rebuilt_types: decode::Announced,
}

/// A batch's reads from the source, waiting to be written to the target.
pub(crate) struct Read {
    /// For each key read whole (its index in the batch): what was found, and its expiry as
    /// absolute Unix milliseconds (0 for none), converted when the reply arrived.
    small: Vec<(usize, Found, u64)>,
    /// Keys to DUMP that did not fit in the batch's budget beside what `small` holds: groups
    /// (indexes in the batch) each within the budget, read and written one at a time when the
    /// batch is written, so a batch never holds more than one group of them.
    later: Vec<Vec<usize>>,
    /// Collections over the size threshold (index in the batch, type), walked at write time.
    big: Vec<(usize, KeyType)>,
}

/// How a MULTI reads values ([`Copier::read`]).
#[derive(Clone, Copy)]
enum ValueCommand {
    /// `GETRANGE key 0 <cap>`: a string of up to `cap` bytes, whole.
    Prefix(u64),
    /// `DUMP key`: any value, as a payload for RESTORE.
    Dump,
}

impl ValueCommand {
    fn name(self) -> &'static str {
        match self {
            ValueCommand::Prefix(_) => "GETRANGE",
            ValueCommand::Dump => "DUMP",
        }
    }
}

/// One key's value as the MULTI read it.
enum Found {
    /// The key is gone: it is deleted on the target.
    Gone,
    /// A string's value, written with SET.
    String(Bytes),
    /// A DUMP payload, written with RESTORE.
    Payload(Bytes),
}

impl Found {
    fn len(&self) -> usize {
        match self {
            Found::Gone => 0,
            Found::String(value) => value.len(),
            Found::Payload(payload) => payload.len(),
        }
    }
}

impl Copier {
    /// Reads a batch on `link` (a raw connection to the source). First every key as a string
    /// with its expiry, in one MULTI: `GETRANGE key 0 <cap>` returns a string of up to `cap`
    /// bytes whole, and the expiry command says whether the key exists at all (GETRANGE answers
    /// "" for a missing key too). The cap is the key's share of the batch's budget
    /// ([`budget::string_cap`]), so this reply stays within it. What is left — keys of other
    /// types (WRONGTYPE) and strings over the cap — is read the general way: MEMORY USAGE, TYPE
    /// for the keys over the big-value threshold (walked in chunks, strings too), then
    /// DUMP and expiry of the others, in MULTIs of keys whose sizes fit the budget
    /// ([`budget::groups`]): the first now, beside the strings, the rest when the batch is
    /// written ([`Read::later`]). Each MULTI makes a key's value and expiry describe the same
    /// moment, which is all the exactness argument ([`super::scan`]) asks of a read; nothing
    /// there needs two keys read at one moment, so a batch may take several MULTIs.
    pub(crate) async fn read(&self, link: &mut Link, keys: &[(Key, ReplacePolicy)]) -> Result<Read, ReplicateError> {
        let mut read = Read { small: Vec::with_capacity(keys.len()), later: Vec::new(), big: Vec::new() };
        let mut rest = Vec::new();
        let cap = budget::string_cap(self.batch_bytes, keys.len(), self.big_key_bytes);
        let replies = self.read_values(link, keys, 0..keys.len(), ValueCommand::Prefix(cap)).await?;
        for (i, reply) in replies.into_iter().enumerate() {
            match reply {
                (_, None) => read.small.push((i, Found::Gone, 0)),
                // GETRANGE 0 <cap> returns up to cap + 1 bytes: a value of at most cap bytes is
                // the whole string, a longer one was cut.
                (BytesFrame::BulkString(value), Some(at)) if value.len() as u64 <= cap => {
                    read.small.push((i, Found::String(value), at))
                }
                (BytesFrame::BulkString(_), Some(_)) => rest.push(i),
                (BytesFrame::Error(err), Some(_)) if err.starts_with("WRONGTYPE") => rest.push(i),
                (other, _) => return Err(link.error(format!("unexpected reply to `GETRANGE`: {other:?}"))),
            }
        }
        if rest.is_empty() {
            return Ok(read);
        }
        let sizes = keys::sizes(&self.source, rest.iter().map(|&i| &keys[i].0)).await?;
        let over: Vec<usize> = rest
            .iter()
            .zip(&sizes)
            .filter(|(_, size)| size.is_some_and(|b| b > self.big_key_bytes))
            .map(|(&i, _)| i)
            .collect();
        let kinds = keys::types(&self.source, over.iter().map(|&i| &keys[i].0)).await?;
        read.big =
            over.into_iter().zip(kinds).filter_map(|(i, kind)| Some((i, kind.filter(|k| k.chunkable())?))).collect();
        // No size: the key vanished since the string read (its DUMP will be a null, so it counts
        // as nothing). A server that refuses MEMORY USAGE has its sizes estimated from the
        // type and length instead ([`keys::sizes`]).
        let (rest, sizes): (Vec<usize>, Vec<u64>) = rest
            .into_iter()
            .zip(sizes)
            .filter(|(i, _)| !read.big.iter().any(|(big, _)| big == i))
            .map(|(i, size)| (i, size.unwrap_or(0)))
            .unzip();
        let held = read.small.iter().map(|(_, found, _)| found.len() as u64).sum();
        let mut groups = budget::groups(&sizes, self.batch_bytes, held).into_iter().map(|group| rest[group].to_vec());
        if let Some(now) = groups.next() {
            read.small.extend(self.dump(link, keys, &now).await?);
        }
        read.later = groups.collect();
        Ok(read)
    }

    /// DUMP and expiry of each of `which` in one MULTI on `link`.
    async fn dump(
        &self,
        link: &mut Link,
        keys: &[(Key, ReplacePolicy)],
        which: &[usize],
    ) -> Result<Vec<(usize, Found, u64)>, ReplicateError> {
        let replies = self.read_values(link, keys, which.iter().copied(), ValueCommand::Dump).await?;
        which
            .iter()
            .zip(replies)
            .map(|(&i, reply)| match reply {
                (BytesFrame::Null, _) | (_, None) => Ok((i, Found::Gone, 0)),
                (BytesFrame::BulkString(payload), Some(at)) => Ok((i, Found::Payload(payload), at)),
                (other, _) => Err(link.error(format!("unexpected reply to `DUMP`: {other:?}"))),
            })
            .collect()
    }

    /// Sends one MULTI on `link` with, for each key of `which`, the value command and the
    /// expiry command; returns each key's value reply and its expiry as absolute Unix
    /// milliseconds (0 for none; `None` when the key does not exist).
    async fn read_values(
        &self,
        link: &mut Link,
        keys: &[(Key, ReplacePolicy)],
        which: impl ExactSizeIterator<Item = usize>,
        command: ValueCommand,
    ) -> Result<Vec<(BytesFrame, Option<u64>)>, ReplicateError> {
        let n = which.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let expiry_name = self.expiry.name().as_bytes();
        let mut request = Vec::with_capacity(64 * (1 + n));
        encode_into(&mut request, &[b"MULTI"]);
        let cap = match command {
            ValueCommand::Prefix(cap) => Some(Decimal::new(cap)),
            ValueCommand::Dump => None,
        };
        for i in which {
            let key = &keys[i].0;
            match &cap {
                Some(cap) => encode_into(&mut request, &[b"GETRANGE", key, b"0", cap.as_bytes()]),
                None => encode_into(&mut request, &[b"DUMP", key]),
            }
            encode_into(&mut request, &[expiry_name, key]);
        }
        encode_into(&mut request, &[b"EXEC"]);
        self.source.spend(2 + 2 * n).await;
        link.send(&request).await?;
        let name = command.name();
        // +OK for MULTI and +QUEUED for each command; an error here means a refused command.
        for _ in 0..1 + 2 * n {
            if let BytesFrame::Error(err) = link.reply().await? {
                return Err(link.error(format!("`{name}` or `{}` refused: {err}", self.expiry.name())));
            }
        }
        let replies = match link.reply().await? {
            BytesFrame::Array(replies) if replies.len() == 2 * n => replies,
            other => return Err(link.error(format!("unexpected reply to `EXEC`: {other:?}"))),
        };
        let mut replies = replies.into_iter();
        let mut values = Vec::with_capacity(n);
        while let (Some(value), Some(expiry)) = (replies.next(), replies.next()) {
            let expiry = match expiry {
                BytesFrame::Integer(-2) => None,
                BytesFrame::Integer(n) => Some(self.expiry.absolute_ms(n)),
                other => return Err(link.error(format!("unexpected reply to `{}`: {other:?}", self.expiry.name()))),
            };
            values.push((value, expiry));
        }
        Ok(values)
    }

    /// Makes the target's copy of each key equal to what [`Copier::read`] found: one pipeline
    /// on `link` (a raw connection to the target) of SET or RESTORE ... ABSTTL (DEL for keys the
    /// source no longer had) plus a DEL for each of `stale` (target keys the source lacks); then
    /// each group of keys left for later, DUMPed on `source` (a raw connection to the source
    /// the read stage is not using) and restored the same way; then the big keys walked in
    /// chunks. These late reads, like the chunk walks, follow the batch's forming, which is what
    /// the exactness argument ([`super::scan`]) needs. A key's policy decides what happens when
    /// it already exists on the target.
    pub(crate) async fn write(
        &self,
        link: &mut Link,
        source: &mut Link,
        keys: &[(Key, ReplacePolicy)],
        read: Read,
        stale: &[Key],
    ) -> Result<CopyStats, ReplicateError> {
        let Read { small, later, big } = read;
        let mut stats = self.apply(link, keys, small, stale).await?;
        for group in later {
            let found = self.dump(source, keys, &group).await?;
            stats += self.apply(link, keys, found, &[]).await?;
        }
        for (i, kind) in big {
            let (key, policy) = &keys[i];
            stats += self.copy_big(key, kind, *policy).await?;
        }
        Ok(stats)
    }

    /// Writes what was found for some keys of the batch, and DELs `stale`, in one pipeline.
    async fn apply(
        &self,
        link: &mut Link,
        keys: &[(Key, ReplacePolicy)],
        small: Vec<(usize, Found, u64)>,
        stale: &[Key],
    ) -> Result<CopyStats, ReplicateError> {
        let mut stats = CopyStats::default();
        let value_bytes: usize = small.iter().map(|(_, found, _)| found.len()).sum();
        let mut request = Vec::with_capacity(value_bytes + 64 * (small.len() + stale.len()));
        for (i, found, expiry) in &small {
            let (key, policy) = &keys[*i];
            match found {
                Found::Gone if *policy == ReplacePolicy::Replace => encode_into(&mut request, &[b"DEL", key]),
                // Gone from the source before `fail` or `skip` settled it: a copy on the target
                // is not ours to delete but one it had before, which the policy decides about.
                Found::Gone => encode_into(&mut request, &[b"EXISTS", key]),
                Found::String(value) => {
                    let expiry = (*expiry > 0).then_some(*expiry);
                    encode_set(&mut request, key, value, expiry, *policy, self.set_expiry);
                }
                Found::Payload(payload) => {
                    let at = expiry.to_string();
                    let restore: [&[u8]; 6] = [b"RESTORE", key, at.as_bytes(), payload, b"ABSTTL", b"REPLACE"];
                    let replace = usize::from(*policy == ReplacePolicy::Replace);
                    encode_into(&mut request, &restore[..5 + replace]);
                }
            }
        }
        for key in stale {
            encode_into(&mut request, &[b"DEL", key]);
        }
        if !request.is_empty() {
            self.target.spend(small.len() + stale.len()).await;
            link.send(&request).await?;
        }
        for (i, found, expiry) in &small {
            let (key, policy) = &keys[*i];
            match (link.reply().await?, found) {
                (BytesFrame::Error(err), Found::Payload(_)) if err.starts_with("BUSYKEY") => {
                    self.busy(key, *policy, &mut stats)?
                }
                // `SET … NX` did not set: the target has the key.
                (BytesFrame::Null, Found::String(_)) => self.busy(key, *policy, &mut stats)?,
                // The `EXISTS` of a key gone before it was settled.
                (BytesFrame::Integer(exists), Found::Gone) if *policy != ReplacePolicy::Replace => {
                    if exists > 0 {
                        self.busy(key, *policy, &mut stats)?
                    }
                }
                (BytesFrame::Error(err), Found::Payload(payload)) if decode::unreadable_payload(&err) => {
                    stats += self.rebuild(key, payload, *expiry, *policy).await?;
                }
                (BytesFrame::Error(err), found) => {
                    let command = match found {
                        Found::Gone if *policy != ReplacePolicy::Replace => "EXISTS",
                        Found::Gone => "DEL",
                        Found::String(_) => "SET",
                        Found::Payload(_) => "RESTORE",
                    };
                    return Err(link.error(format!("`{command}` of key {} failed: {err}", printable(key))));
                }
                (_, Found::Gone) => stats.deleted += 1,
                _ => stats.copied += 1,
            }
        }
        for _ in stale {
            if let BytesFrame::Error(err) = link.reply().await? {
                return Err(link.error(format!("`DEL` failed: {err}")));
            }
        }
        stats.deleted += stale.len() as u64;
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
        self.rebuilt_types.rebuilding(key, object);
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
                stats.kept.push(key.to_vec());
                Ok(())
            }
        }
    }

    /// Walks a big value into `eden:tmp:<key>` on the target, then atomically sets the expiry
    /// and RENAMEs it over the key. The walk's reads, like every read of the batch, follow the
    /// batch's forming: a write to the key during the walk is notified after it and copies the
    /// key again later ([`super::scan`]), so a walk that mixed states is overwritten in turn.
    async fn copy_big(&self, key: &[u8], kind: KeyType, policy: ReplacePolicy) -> Result<CopyStats, ReplicateError> {
        let mut stats = CopyStats::default();
        if policy != ReplacePolicy::Replace && keys::exists(&self.target, &[key.to_vec()]).await?[0] {
            self.busy(key, policy, &mut stats)?;
            return Ok(stats);
        }
        let expiry: i64 = self.source.cmd(self.expiry.name(), cmd(self.expiry.name()).arg(key)).await?;
        let expiry = self.expiry.absolute_ms(expiry);
        let tmp = [TMP_PREFIX, key].concat();
        self.target.cmd::<()>("DEL", cmd("DEL").arg(&tmp)).await?;
        let wrote = match self.walk(key, kind, &tmp).await {
            Ok(wrote) => wrote,
            // The key became another type during the walk: the write that made it so is
            // notified, and copies it again; what was walked is not a value it ever had.
            Err(ReplicateError::Command { source, .. }) if source.code() == Some("WRONGTYPE") => {
                self.target.cmd::<()>("DEL", cmd("DEL").arg(&tmp)).await?;
                return Ok(stats);
            }
            Err(err) => return Err(err),
        };
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

    /// Copies `key`'s elements (a string's bytes) chunk by chunk into `tmp`; whether there
    /// were any.
    async fn walk(&self, key: &[u8], kind: KeyType, tmp: &[u8]) -> Result<bool, ReplicateError> {
        let mut chunks = Chunks::new(&self.source, key, kind, self.chunk);
        let mut wrote = false;
        while let Some(chunk) = chunks.next().await? {
            let mut write = match chunk {
                Chunk::Flat(items) if items.is_empty() => continue,
                Chunk::Flat(items) => {
                    let mut write = pipe();
                    write.add_command(flat_write(kind, tmp, &items));
                    write
                }
                Chunk::Stream(entries) => streams::entries(&self.source, tmp, &entries)?,
            };
            for reply in self.target.pipe("chunk write", &mut write).await? {
                self.target.ok("chunk write", reply)?;
            }
            wrote = true;
        }
        Ok(wrote)
    }
}

/// The command adding one chunk of a string, list, hash, set or sorted set to `key`.
fn flat_write(kind: KeyType, key: &[u8], items: &[Key]) -> redis::Cmd {
    let mut write = match kind {
        KeyType::String => cmd("APPEND"),
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
