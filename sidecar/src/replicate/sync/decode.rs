//! The fallback for a target that cannot RESTORE a value (an older server refuses a newer RDB
//! version): decode the value and rebuild it with ordinary commands.
//!
//! Covered: strings (from scan mode's DUMP payloads; sync mode's loader writes them with
//! `MSET`/`SET` itself), and lists, sets, hashes and sorted sets in every encoding Redis 7.2
//! writes or still reads (plain, ziplist, listpack, intset, quicklist). Not covered: streams (their consumer
//! groups have no faithful command form), module values and the ancient zipmap; those stop
//! replication with an error naming the key.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tracing::warn;

use super::rdb::{Memory, Piece, Snapshot, Walk, kind};
use crate::replicate::ReplicateError;
use crate::replicate::endpoint::printable;

/// Elements per rebuilding command, so no single command grows with the value.
const ELEMENTS_PER_COMMAND: usize = 1000;

/// A command as its arguments.
pub(crate) type Args = Vec<Vec<u8>>;

/// Whether a RESTORE error says the target cannot read the payload (rather than, say, BUSYKEY):
/// a newer RDB version, or a value type it does not know.
pub(crate) fn unreadable_payload(error: &str) -> bool {
    error.contains("payload") || error.contains("Bad data format")
}

/// The value types whose rebuilding was already logged: one line per type, not per key.
#[derive(Debug, Default)]
pub(crate) struct Announced(Mutex<HashSet<u8>>);

impl Announced {
    /// Logs, the first time for its type, that `object` (type byte + encoding) of `key` is
    /// rebuilt with commands because the target cannot read the source's payloads.
    pub(crate) fn rebuilding(&self, key: &[u8], object: &[u8]) {
        let value_type = object.first().copied().unwrap_or_default();
        if self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(value_type) {
            warn!(
                value_type,
                key = %printable(key),
                "the target cannot read this server's DUMP payloads for this value type (it is probably an older \
                 Redis); rebuilding such keys with ordinary commands"
            );
        }
    }
}

/// The error for a value [`commands`] could not rebuild, on `server`.
pub(crate) fn unrebuildable(server: &Arc<str>, key: &[u8], err: ReplicateError) -> ReplicateError {
    let detail = match err {
        ReplicateError::Rdb { detail, .. } => detail,
        other => other.to_string(),
    };
    ReplicateError::Unrebuildable { server: server.clone(), key: printable(key), detail }
}

/// The value in a DUMP payload (type byte + encoding), without the RDB version and CRC64 that
/// end it.
pub(crate) fn dumped_object(payload: &[u8]) -> &[u8] {
    &payload[..payload.len().saturating_sub(10)]
}

/// Commands that recreate `key` from `object` (type byte + encoding), expiry included. The
/// key must not exist when they run.
pub(crate) async fn commands(
    key: &[u8],
    object: &[u8],
    expire_at_ms: Option<u64>,
) -> Result<Vec<Args>, ReplicateError> {
    let Some((&value_type, body)) = object.split_first() else { return Err(bad("an empty value")) };
    let mut feed = Memory(BytesMut::from(body));
    let mut value = Snapshot::value(&mut feed, body.len());
    let owned = |args: Vec<&[u8]>| args.into_iter().map(<[u8]>::to_vec).collect::<Args>();
    let mut out = Vec::new();
    if value_type == kind::STRING {
        // Sync mode writes strings with MSET/SET itself; scan mode's DUMP payloads still bring
        // them here.
        out.push(owned(vec![b"SET", key, &value.string().await?]));
    } else if Walk::walks(value_type) {
        let mut elements = Vec::new();
        let mut walk = Walk::new(value_type);
        while let Some(piece) = walk.next(&mut value, true).await? {
            match piece {
                Piece::Elements(piece) => elements.extend(piece),
                Piece::Commands(_) => return Err(bad("a stream's consumer groups have no faithful command form here")),
            }
        }
        let command = collection_command(value_type);
        out.extend(elements.chunks(ELEMENTS_PER_COMMAND * 2).map(|chunk| owned(add_args(command, key, chunk))));
    } else {
        return Err(bad(&format!("value type {value_type} (a stream or module value) has no command form")));
    }
    if let Some(at) = expire_at_ms {
        out.push(vec![b"PEXPIREAT".to_vec(), key.to_vec(), at.to_string().into_bytes()]);
    }
    Ok(out)
}

/// The command that adds elements of a value of this type: `RPUSH`, `SADD`, `HSET`, `ZADD`.
pub(crate) fn collection_command(value_type: u8) -> &'static [u8] {
    match value_type {
        kind::SET | kind::SET_INTSET | kind::SET_LISTPACK => b"SADD",
        kind::HASH | kind::HASH_ZIPLIST | kind::HASH_LISTPACK => b"HSET",
        kind::ZSET | kind::ZSET_2 | kind::ZSET_ZIPLIST | kind::ZSET_LISTPACK => b"ZADD",
        _ => b"RPUSH",
    }
}

/// The arguments of `command` adding `elements` (flat, as a [`Walk`] yields them) to `key`. A
/// sorted set's elements are member, score pairs; ZADD takes score, member.
pub(crate) fn add_args<'a>(command: &'a [u8], key: &'a [u8], elements: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    let mut args = Vec::with_capacity(2 + elements.len());
    args.extend([command, key]);
    if command == b"ZADD" {
        for pair in elements.chunks(2) {
            args.extend(pair.iter().rev().map(Vec::as_slice));
        }
    } else {
        args.extend(elements.iter().map(Vec::as_slice));
    }
    args
}

fn bad(detail: &str) -> ReplicateError {
    ReplicateError::Rdb { offset: 0, detail: detail.to_string() }
}

/// A cursor over an encoded blob that fails instead of panicking when the blob is short.
struct Cursor<'a> {
    blob: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReplicateError> {
        let bytes = self.blob.get(self.pos..self.pos.checked_add(n).ok_or_else(|| bad("length overflow"))?);
        let bytes = bytes.ok_or_else(|| bad("an encoded value ends early"))?;
        self.pos += n;
        Ok(bytes)
    }

    fn uint_le(&mut self, n: usize) -> Result<u64, ReplicateError> {
        Ok(self.take(n)?.iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b)))
    }

    /// A little-endian two's complement integer of `n` bytes.
    fn int_le(&mut self, n: usize) -> Result<i64, ReplicateError> {
        let raw = self.uint_le(n)?;
        let shift = 64 - 8 * n as u32;
        Ok(((raw << shift) as i64) >> shift)
    }
}

fn int_text(n: i64) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// An intset: encoding width, count, then the integers.
pub(crate) fn intset(blob: &[u8]) -> Result<Vec<Vec<u8>>, ReplicateError> {
    let mut cur = Cursor { blob, pos: 0 };
    let width = cur.uint_le(4)? as usize;
    if !matches!(width, 2 | 4 | 8) {
        return Err(bad("an intset of unknown width"));
    }
    (0..cur.uint_le(4)?).map(|_| cur.int_le(width).map(int_text)).collect()
}

/// A listpack (`listpack.c`): total bytes, count, entries each followed by a back-length.
pub(crate) fn listpack(blob: &[u8]) -> Result<Vec<Vec<u8>>, ReplicateError> {
    let mut cur = Cursor { blob, pos: 6 };
    let mut out = Vec::new();
    loop {
        let start = cur.pos;
        let first = cur.take(1)?[0];
        let element = match first {
            0xff => return Ok(out),
            b if b & 0x80 == 0 => int_text(i64::from(b & 0x7f)),
            b if b & 0xc0 == 0x80 => cur.take(usize::from(b & 0x3f))?.to_vec(),
            b if b & 0xe0 == 0xc0 => {
                let raw = u16::from(b & 0x1f) << 8 | u16::from(cur.take(1)?[0]);
                int_text(i64::from(((raw << 3) as i16) >> 3))
            }
            b if b & 0xf0 == 0xe0 => {
                let len = usize::from(b & 0x0f) << 8 | usize::from(cur.take(1)?[0]);
                cur.take(len)?.to_vec()
            }
            0xf0 => {
                let len = cur.uint_le(4)? as usize;
                cur.take(len)?.to_vec()
            }
            0xf1 => int_text(cur.int_le(2)?),
            0xf2 => int_text(cur.int_le(3)?),
            0xf3 => int_text(cur.int_le(4)?),
            0xf4 => int_text(cur.int_le(8)?),
            other => return Err(bad(&format!("listpack entry encoding {other:#x}"))),
        };
        // The back-length covers the entry's own bytes: 1 byte per 7 bits.
        let entry_len = cur.pos - start;
        cur.take(match entry_len {
            0..128 => 1,
            128..16384 => 2,
            16384..2097152 => 3,
            2097152..268435456 => 4,
            _ => 5,
        })?;
        out.push(element);
    }
}

/// A ziplist (`ziplist.c`, Redis < 7): header, entries each led by the previous length.
pub(crate) fn ziplist(blob: &[u8]) -> Result<Vec<Vec<u8>>, ReplicateError> {
    let mut cur = Cursor { blob, pos: 10 };
    let mut out = Vec::new();
    loop {
        let prev = cur.take(1)?[0];
        match prev {
            0xff => return Ok(out),
            0xfe => drop(cur.take(4)?),
            _ => {}
        }
        let first = cur.take(1)?[0];
        let element = match first >> 6 {
            0 => cur.take(usize::from(first & 0x3f))?.to_vec(),
            1 => {
                let len = usize::from(first & 0x3f) << 8 | usize::from(cur.take(1)?[0]);
                cur.take(len)?.to_vec()
            }
            2 => {
                let len = u32::from_be_bytes(cur.take(4)?.try_into().map_err(|_| bad("ziplist length"))?);
                cur.take(len as usize)?.to_vec()
            }
            _ => int_text(match first {
                0xc0 => cur.int_le(2)?,
                0xd0 => cur.int_le(4)?,
                0xe0 => cur.int_le(8)?,
                0xf0 => cur.int_le(3)?,
                0xfe => cur.int_le(1)?,
                0xf1..=0xfd => i64::from(first & 0x0f) - 1,
                other => return Err(bad(&format!("ziplist entry encoding {other:#x}"))),
            }),
        };
        out.push(element);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_blobs_decode_and_short_ones_fail() {
        // intset of int16: 5, -2
        let set = [2, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0xfe, 0xff];
        assert_eq!(intset(&set).unwrap(), [b"5".to_vec(), b"-2".to_vec()]);
        // listpack: "ab", 7, -3 (13-bit), then end
        let lp = [0, 0, 0, 0, 3, 0, 0x82, b'a', b'b', 3, 7, 1, 0xdf, 0xfd, 2, 0xff];
        assert_eq!(listpack(&lp).unwrap(), [b"ab".to_vec(), b"7".to_vec(), b"-3".to_vec()]);
        // ziplist: "x", immediate 3, int8 -1
        let zl = [0; 10].into_iter().chain([0, 1, b'x', 3, 0xf4, 2, 0xfe, 0xff, 0xff]).collect::<Vec<u8>>();
        assert_eq!(ziplist(&zl).unwrap(), [b"x".to_vec(), b"3".to_vec(), b"-1".to_vec()]);
        assert!(listpack(&lp[..8]).is_err() && ziplist(&zl[..12]).is_err() && intset(&set[..9]).is_err());
    }

    /// Values in each encoding a Redis 7 server picks (listpack, intset, hashtable, skiplist,
    /// quicklist) decode into commands that rebuild them equal.
    #[tokio::test]
    async fn values_dumped_by_a_real_server_rebuild_equal() {
        let server = eden_e2e::RedisServer::start().unwrap();
        let mut con = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let many: Vec<u32> = (0..300).collect();
        let mut p = redis::pipe();
        p.rpush("small-list", &[1, 2, 3]).rpush("list", &many);
        p.sadd("intset", &[5, -7]).sadd("set", many.iter().map(|i| format!("m{i}")).collect::<Vec<_>>());
        p.sadd("small-set", &["a", "b"]).hset_multiple("small-hash", &[("f", "v"), ("n", "-3")]);
        p.hset_multiple("hash", &many.iter().map(|i| (format!("f{i}"), i)).collect::<Vec<_>>());
        p.zadd_multiple("small-zset", &[(1.5, "a"), (-2.0, "b")]);
        p.zadd_multiple("zset", &many.iter().map(|i| (f64::from(*i) / 7.0, format!("m{i}"))).collect::<Vec<_>>());
        p.exec_async(&mut con).await.unwrap();
        let keys = ["small-list", "list", "intset", "set", "small-set", "small-hash", "hash", "small-zset", "zset"];
        for key in keys {
            let dump: Vec<u8> = redis::cmd("DUMP").arg(key).query_async(&mut con).await.unwrap();
            let object = &dump[..dump.len() - 10];
            let rebuilt = format!("rebuilt:{key}");
            for args in commands(rebuilt.as_bytes(), object, Some(4_000_000_000_000)).await.unwrap() {
                let mut command = redis::cmd(std::str::from_utf8(&args[0]).unwrap());
                command.arg(&args[1..]);
                let _: redis::Value = command.query_async(&mut con).await.unwrap();
            }
            let read = |k: &str| {
                let mut con = con.clone();
                let k = k.to_string();
                async move {
                    let kind: String = redis::cmd("TYPE").arg(&k).query_async(&mut con).await.unwrap();
                    let mut read = match kind.as_str() {
                        "list" => redis::cmd("LRANGE"),
                        "set" => redis::cmd("SMEMBERS"),
                        "hash" => redis::cmd("HGETALL"),
                        _ => redis::cmd("ZRANGE"),
                    };
                    read.arg(&k);
                    match kind.as_str() {
                        "list" | "zset" => read.arg(0).arg(-1),
                        _ => &mut read,
                    };
                    if kind == "zset" {
                        read.arg("WITHSCORES");
                    }
                    let mut value: Vec<Vec<u8>> = read.query_async(&mut con).await.unwrap();
                    if kind == "set" || kind == "hash" {
                        value.sort();
                    }
                    (kind, value)
                }
            };
            assert_eq!(read(key).await, read(&rebuilt).await, "{key}");
            let ttl: i64 = redis::cmd("PEXPIRETIME").arg(&rebuilt).query_async(&mut con).await.unwrap();
            assert_eq!(ttl, 4_000_000_000_000, "{key}");
        }
    }
}
