//! Finding keys (SCAN) and learning what they are (TYPE, MEMORY USAGE) in pipelined batches.
//!
//! Both the replicator and the verifier decide per key whether the value is small enough to move
//! as one DUMP payload or must be walked in chunks; that decision needs the type and an estimate of
//! the size before the value itself is read.

use redis::{Value, cmd, pipe};
use serde::{Deserialize, Serialize};

use super::endpoint::{Endpoint, as_bytes, as_int};
use super::{Key, ReplicateError};

/// The Redis data types the engine understands; module types are `Other` and always move as
/// DUMP payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    String,
    List,
    Hash,
    Set,
    ZSet,
    Stream,
    Other,
}

impl KeyType {
    /// Parses a TYPE reply; `None` for "none" (the key does not exist).
    fn parse(reply: &[u8]) -> Option<KeyType> {
        Some(match reply {
            b"none" => return None,
            b"string" => KeyType::String,
            b"list" => KeyType::List,
            b"hash" => KeyType::Hash,
            b"set" => KeyType::Set,
            b"zset" => KeyType::ZSet,
            b"stream" => KeyType::Stream,
            _ => KeyType::Other,
        })
    }

    /// The O(1) command that counts a collection's elements (bytes for strings).
    pub(crate) fn len_command(self) -> Option<&'static str> {
        match self {
            KeyType::String => Some("STRLEN"),
            KeyType::List => Some("LLEN"),
            KeyType::Hash => Some("HLEN"),
            KeyType::Set => Some("SCARD"),
            KeyType::ZSet => Some("ZCARD"),
            KeyType::Stream => Some("XLEN"),
            KeyType::Other => None,
        }
    }

    /// Whether values of this type can be copied element by element, a string range by range
    /// ([`super::chunks`]; a stream's groups follow its entries, [`super::streams`]).
    pub(crate) fn chunkable(self) -> bool {
        self != KeyType::Other
    }
}

/// What one key is, as of one pipelined round trip.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyInfo {
    /// `None` when the key does not exist.
    pub(crate) kind: Option<KeyType>,
    /// MEMORY USAGE estimate; `None` when the server refuses the command.
    pub(crate) bytes: Option<u64>,
    /// PTTL: -1 without expiry, -2 when missing.
    pub(crate) pttl: i64,
}

impl KeyInfo {
    /// A value to walk in chunks rather than DUMP whole.
    pub(crate) fn is_big(&self, threshold: u64) -> bool {
        self.kind.is_some_and(KeyType::chunkable) && self.bytes.is_some_and(|b| b > threshold)
    }
}

/// One SCAN step: the next cursor (0 when the iteration is complete) and the keys found.
pub(crate) async fn scan(ep: &Endpoint, cursor: u64, count: usize) -> Result<(u64, Vec<Key>), ReplicateError> {
    ep.cmd("SCAN", cmd("SCAN").arg(cursor).arg("COUNT").arg(count)).await
}

/// TYPE, PTTL and MEMORY USAGE (sampled, so O(1)-ish) for each key, in one round trip.
pub(crate) async fn inspect(ep: &Endpoint, keys: &[Key]) -> Result<Vec<KeyInfo>, ReplicateError> {
    let mut p = pipe();
    for key in keys {
        p.cmd("TYPE").arg(key).cmd("PTTL").arg(key).cmd("MEMORY").arg("USAGE").arg(key);
    }
    let replies = ep.pipe("TYPE/PTTL/MEMORY USAGE", &mut p).await?;
    replies
        .chunks(3)
        .map(|r| {
            let kind = parse_type(ep, &ep.ok("TYPE", r[0].clone())?)?;
            let pttl = as_int(&r[1]).ok_or_else(|| ep.unexpected("PTTL", &r[1]))?;
            Ok(KeyInfo { kind, bytes: as_int(&r[2]).map(|n| n.max(0) as u64), pttl })
        })
        .collect()
}

/// Bytes a collection's element is taken to hold where MEMORY USAGE is refused: a guess that
/// leans towards walking a value in chunks (which any size survives) over DUMPing it whole.
const ASSUMED_ELEMENT_BYTES: u64 = 1 << 10;

/// MEMORY USAGE of each key, in one round trip: all the copier needs to tell a value to DUMP
/// whole from one to walk in chunks (the type matters only above the threshold; see
/// [`types`]). `None` for a missing key. Where the server refuses MEMORY USAGE (renamed or
/// denied), the size is estimated from TYPE and the O(1) length ([`KeyType::len_command`]):
/// a string's bytes, or [`ASSUMED_ELEMENT_BYTES`] per element, so a huge value is still never
/// DUMPed whole.
pub(crate) async fn sizes<'a>(
    ep: &Endpoint,
    keys: impl IntoIterator<Item = &'a Key>,
) -> Result<Vec<Option<u64>>, ReplicateError> {
    let keys: Vec<&Key> = keys.into_iter().collect();
    let replies = per_key(ep, "MEMORY USAGE", keys.iter().copied()).await?;
    let mut sizes: Vec<Option<u64>> = replies.iter().map(|r| as_int(r).map(|n| n.max(0) as u64)).collect();
    let refused: Vec<usize> = (0..keys.len()).filter(|&i| matches!(replies[i], Value::ServerError(_))).collect();
    if refused.is_empty() {
        return Ok(sizes);
    }
    let kinds = types(ep, refused.iter().map(|&i| keys[i])).await?;
    let measured: Vec<(usize, KeyType, &'static str)> =
        refused.iter().zip(kinds).filter_map(|(&i, kind)| kind.and_then(|k| Some((i, k, k.len_command()?)))).collect();
    let mut p = pipe();
    for &(i, _, len) in &measured {
        p.cmd(len).arg(keys[i]);
    }
    for (&(i, kind, _), reply) in measured.iter().zip(ep.pipe("length", &mut p).await?) {
        let per_element = if kind == KeyType::String { 1 } else { ASSUMED_ELEMENT_BYTES };
        sizes[i] = as_int(&reply).map(|n| (n.max(0) as u64).saturating_mul(per_element));
    }
    Ok(sizes)
}

/// TYPE of each key, in one round trip; `None` for a missing key.
pub(crate) async fn types<'a>(
    ep: &Endpoint,
    keys: impl IntoIterator<Item = &'a Key>,
) -> Result<Vec<Option<KeyType>>, ReplicateError> {
    let replies = per_key(ep, "TYPE", keys).await?;
    replies.into_iter().map(|r| parse_type(ep, &ep.ok("TYPE", r)?)).collect()
}

/// Which of `keys` exist on `ep`, in one round trip.
pub(crate) async fn exists(ep: &Endpoint, keys: &[Key]) -> Result<Vec<bool>, ReplicateError> {
    per_key(ep, "EXISTS", keys)
        .await?
        .into_iter()
        .map(|reply| as_int(&reply).map(|n| n > 0).ok_or_else(|| ep.unexpected("EXISTS", &reply)))
        .collect()
}

/// `command key` (a command name of one or more words) for each of `keys`, in one round trip.
async fn per_key<'a>(
    ep: &Endpoint,
    command: &'static str,
    keys: impl IntoIterator<Item = &'a Key>,
) -> Result<Vec<Value>, ReplicateError> {
    let mut p = pipe();
    for key in keys {
        let mut cmd = redis::Cmd::new();
        for word in command.split(' ') {
            cmd.arg(word);
        }
        cmd.arg(key);
        p.add_command(cmd);
    }
    ep.pipe(command, &mut p).await
}

fn parse_type(ep: &Endpoint, reply: &Value) -> Result<Option<KeyType>, ReplicateError> {
    let name = as_bytes(reply).ok_or_else(|| ep.unexpected("TYPE", reply))?;
    Ok(KeyType::parse(name))
}
