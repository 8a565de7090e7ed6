//! Semantic comparison of one key's value on two servers, for when DUMP payloads differ (the
//! same value can have different encodings) or the value is too big to DUMP.
//!
//! Memory stays bounded: collections are compared chunk by chunk. For hashes, sets and sorted
//! sets the lengths must match and every chunk of the source's elements is looked up on the
//! target (HMGET, SMISMEMBER, ZMSCORE); equal sizes plus "every source element is on the target
//! with the same value" means equal. Lists and streams are compared window by window; streams
//! also compare their consumer groups.

use redis::{Value, cmd};

use super::chunks::{Chunk, Chunks};
use super::endpoint::{Endpoint, as_bytes};
use super::{KeyType, ReplicateError};

/// `None` when equal, otherwise what differs.
pub(crate) async fn differs(
    source: &Endpoint,
    target: &Endpoint,
    key: &[u8],
    kind: KeyType,
    chunk: usize,
) -> Result<Option<String>, ReplicateError> {
    if let Some(len) = kind.len_command() {
        let (a, b): (i64, i64) = (source.cmd(len, cmd(len).arg(key)).await?, target.cmd(len, cmd(len).arg(key)).await?);
        if a != b {
            return Ok(Some(format!("{len} {a} on source, {b} on target")));
        }
    }
    match kind {
        KeyType::Hash | KeyType::Set | KeyType::ZSet => members_differ(source, target, key, kind, chunk).await,
        KeyType::String | KeyType::List | KeyType::Stream => windows_differ(source, target, key, kind, chunk).await,
        KeyType::Other => Ok(Some("DUMP payloads of a module type differ".into())),
    }
}

/// Looks each chunk of the source's elements up on the target.
async fn members_differ(
    source: &Endpoint,
    target: &Endpoint,
    key: &[u8],
    kind: KeyType,
    chunk: usize,
) -> Result<Option<String>, ReplicateError> {
    let mut chunks = Chunks::new(source, key, kind, chunk);
    while let Some(Chunk::Flat(items)) = chunks.next().await? {
        if items.is_empty() {
            continue;
        }
        let lookup = match kind {
            KeyType::Hash => "HMGET",
            KeyType::Set => "SMISMEMBER",
            _ => "ZMSCORE",
        };
        let (names, expected): (Vec<&[u8]>, Vec<Option<&[u8]>>) = match kind {
            KeyType::Set => (items.iter().map(Vec::as_slice).collect(), vec![None; items.len()]),
            _ => items.chunks(2).map(|pair| (pair[0].as_slice(), Some(pair[1].as_slice()))).unzip(),
        };
        let found: Vec<Value> = target.cmd(lookup, cmd(lookup).arg(key).arg(&names)).await?;
        for ((name, want), got) in names.iter().zip(expected).zip(found) {
            let same = match (kind, want) {
                (KeyType::Set, _) => got == Value::Int(1),
                (KeyType::ZSet, Some(want)) => as_bytes(&got).and_then(parse_score) == parse_score(want),
                (_, want) => as_bytes(&got) == want,
            };
            if !same {
                return Ok(Some(format!("element {} differs", name.escape_ascii())));
            }
        }
    }
    Ok(None)
}

fn parse_score(bytes: &[u8]) -> Option<f64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Compares ordered collections window by window, and a stream's consumer groups.
async fn windows_differ(
    source: &Endpoint,
    target: &Endpoint,
    key: &[u8],
    kind: KeyType,
    chunk: usize,
) -> Result<Option<String>, ReplicateError> {
    let (mut left, mut right) = (Chunks::new(source, key, kind, chunk), Chunks::new(target, key, kind, chunk));
    loop {
        let (a, b) = (left.next().await?, right.next().await?);
        match (a, b) {
            (None, None) => break,
            (Some(Chunk::Flat(a)), Some(Chunk::Flat(b))) if a == b => {}
            (Some(Chunk::Stream(a)), Some(Chunk::Stream(b))) if a == b => {}
            _ => return Ok(Some(format!("{kind:?} elements differ"))),
        }
    }
    if kind == KeyType::Stream {
        let mut groups = cmd("XINFO");
        groups.arg("GROUPS").arg(key);
        let a: Value = source.cmd("XINFO GROUPS", &groups).await?;
        if a != target.cmd::<Value>("XINFO GROUPS", &groups).await? {
            return Ok(Some("stream consumer groups differ".into()));
        }
    }
    Ok(None)
}
