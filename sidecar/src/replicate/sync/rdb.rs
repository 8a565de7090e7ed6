//! A shallow, streaming reader of the RDB snapshot a source sends its replica.
//!
//! Eden does not rebuild collections from the RDB. It only finds where each key's encoded value
//! begins and ends, and hands those bytes on untouched: an RDB value is byte for byte the body
//! of a `DUMP` payload, so the target's own `RESTORE` decodes it, whatever the encoding
//! (listpack, quicklist, intset, stream, module value). That keeps this reader small — lengths,
//! strings, and the nesting of each type — and keeps memory at one value, however big the
//! snapshot. Strings are the exception: they are decoded (a string is one field), because the
//! target stores a plain string from `MSET` for half the work of a `RESTORE`, and any server
//! takes `SET`, whatever RDB version it reads.
//!
//! The reader pulls from a [`Feed`] (the replication link) exactly the bytes the RDB occupies,
//! so whatever follows in the buffer (the command stream) is left for the stream applier. It
//! checks the RDB's own CRC64 as it goes. Anything malformed is an error, never a panic.

use bytes::{Buf, BytesMut};
use crc::{CRC_64_REDIS, Crc, Digest, Table};
use tracing::warn;

use crate::frame::MAX_BULK_LEN;
use crate::replicate::ReplicateError;

/// CRC-64/Jones as Redis computes it, for the RDB trailer and DUMP payloads.
pub(crate) static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_REDIS);

/// Top-level opcodes (`rdb.h`).
mod op {
    pub(super) const SLOT_INFO: u8 = 244;
    pub(super) const FUNCTION2: u8 = 245;
    pub(super) const FUNCTION_PRE_GA: u8 = 246;
    pub(super) const MODULE_AUX: u8 = 247;
    pub(super) const IDLE: u8 = 248;
    pub(super) const FREQ: u8 = 249;
    pub(super) const AUX: u8 = 250;
    pub(super) const RESIZEDB: u8 = 251;
    pub(super) const EXPIRETIME_MS: u8 = 252;
    pub(super) const EXPIRETIME: u8 = 253;
    pub(super) const SELECTDB: u8 = 254;
    pub(super) const EOF: u8 = 255;
}

/// Value types (`rdb.h`), up to Redis 7.2's.
pub(crate) mod kind {
    pub(crate) const STRING: u8 = 0;
    pub(crate) const LIST: u8 = 1;
    pub(crate) const SET: u8 = 2;
    pub(crate) const ZSET: u8 = 3;
    pub(crate) const HASH: u8 = 4;
    pub(crate) const ZSET_2: u8 = 5;
    pub(crate) const MODULE_2: u8 = 7;
    pub(crate) const HASH_ZIPMAP: u8 = 9;
    pub(crate) const LIST_ZIPLIST: u8 = 10;
    pub(crate) const SET_INTSET: u8 = 11;
    pub(crate) const ZSET_ZIPLIST: u8 = 12;
    pub(crate) const HASH_ZIPLIST: u8 = 13;
    pub(crate) const LIST_QUICKLIST: u8 = 14;
    pub(crate) const STREAM_LISTPACKS: u8 = 15;
    pub(crate) const HASH_LISTPACK: u8 = 16;
    pub(crate) const ZSET_LISTPACK: u8 = 17;
    pub(crate) const LIST_QUICKLIST_2: u8 = 18;
    pub(crate) const STREAM_LISTPACKS_2: u8 = 19;
    pub(crate) const SET_LISTPACK: u8 = 20;
    pub(crate) const STREAM_LISTPACKS_3: u8 = 21;
}

/// Module value opcodes (`RDB_MODULE_OPCODE_*`): a module value is a sequence of these, each
/// followed by its datum, ending with `EOF`.
mod module_op {
    pub(super) const EOF: u64 = 0;
    pub(super) const SINT: u64 = 1;
    pub(super) const UINT: u64 = 2;
    pub(super) const FLOAT: u64 = 3;
    pub(super) const DOUBLE: u64 = 4;
    pub(super) const STRING: u64 = 5;
}

/// Where the reader gets bytes: a buffer it consumes from the front, refilled on demand.
pub(crate) trait Feed {
    fn buffer(&mut self) -> &mut BytesMut;
    /// Reads at least `want` more bytes into the buffer, or fails.
    async fn fill(&mut self, want: usize) -> Result<usize, ReplicateError>;
}

impl Feed for super::link::Link {
    fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    async fn fill(&mut self, want: usize) -> Result<usize, ReplicateError> {
        super::link::Link::fill(self, want).await
    }
}

/// A feed over bytes already in memory (one value being decoded); running out is an error.
pub(crate) struct Memory(pub(crate) BytesMut);

impl Feed for Memory {
    fn buffer(&mut self) -> &mut BytesMut {
        &mut self.0
    }

    async fn fill(&mut self, _: usize) -> Result<usize, ReplicateError> {
        Err(ReplicateError::Rdb { offset: 0, detail: "a value ends early".into() })
    }
}

/// How the source framed the snapshot on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `$<len>\r\n` then exactly `len` bytes (disk-based sync).
    Length(u64),
    /// `$EOF:<mark>\r\n`, the RDB, then the same 40-byte mark (diskless sync).
    EofMark(Vec<u8>),
}

/// One thing the snapshot holds.
#[derive(Debug)]
pub(crate) enum Entry {
    /// A string key; its value decoded (integers as decimal text, LZF decompressed).
    String(KeyEntry),
    /// A key of any other type; its value as encoded in the RDB (type byte first): a DUMP
    /// payload without its trailer.
    Object(KeyEntry),
    /// A function library's source (`FUNCTION LOAD` restores it).
    Function(Vec<u8>),
    /// The number of keys the next database holds (RESIZEDB), for progress.
    DbSize(u64),
    /// The snapshot ended and its checksum matched.
    End,
}

#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub(crate) db: u64,
    pub(crate) key: Vec<u8>,
    /// Absolute expiry in Unix milliseconds.
    pub(crate) expire_at_ms: Option<u64>,
    /// Decoded or encoded, as the [`Entry`] variant says.
    pub(crate) value: Vec<u8>,
}

/// A length-encoded field: a length, or one of the special string encodings.
enum Length {
    Len(u64),
    Encoded(u8),
}

/// Reads one snapshot from a [`Feed`].
pub(crate) struct Snapshot<'a, F: Feed> {
    feed: &'a mut F,
    framing: Framing,
    /// RDB bytes consumed so far (for error positions and the length check).
    consumed: u64,
    digest: Digest<'static, u64, Table<16>>,
    /// While reading a value: every byte taken, to hand on as the value's encoding.
    capture: Option<Vec<u8>>,
    version: u16,
    db: u64,
}

impl<'a, F: Feed> Snapshot<'a, F> {
    /// Reads the `REDISnnnn` header.
    pub(crate) async fn open(feed: &'a mut F, framing: Framing) -> Result<Self, ReplicateError> {
        let mut snapshot = Snapshot::value(feed, 0);
        snapshot.framing = framing;
        let version = snapshot
            .take(9, |header| header.strip_prefix(b"REDIS").and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()))
            .await?
            .ok_or_else(|| snapshot.malformed("no REDIS header"))?;
        snapshot.version = version;
        Ok(snapshot)
    }

    /// Reads one value's bytes (no header, no trailer): the fallback decoder's view of a
    /// value the target could not RESTORE.
    pub(crate) fn value(feed: &'a mut F, len: usize) -> Self {
        let framing = Framing::Length(len as u64);
        Snapshot { feed, framing, consumed: 0, digest: CRC64.digest(), capture: None, version: 0, db: 0 }
    }

    /// The RDB format version, which DUMP payloads built from these values carry.
    pub(crate) fn version(&self) -> u16 {
        self.version
    }

    fn malformed(&self, detail: impl Into<String>) -> ReplicateError {
        ReplicateError::Rdb { offset: self.consumed, detail: detail.into() }
    }

    /// The next entry; [`Entry::End`] once the trailer checked out.
    pub(crate) async fn next(&mut self) -> Result<Entry, ReplicateError> {
        let mut expire_at_ms = None;
        loop {
            match self.byte().await? {
                op::EOF => {
                    self.finish().await?;
                    return Ok(Entry::End);
                }
                op::SELECTDB => self.db = self.len().await?,
                op::RESIZEDB => {
                    let keys = self.len().await?;
                    self.len().await?;
                    return Ok(Entry::DbSize(keys));
                }
                op::EXPIRETIME_MS => expire_at_ms = Some(u64::from_le_bytes(self.array().await?)),
                op::EXPIRETIME => expire_at_ms = Some(u64::from(u32::from_le_bytes(self.array().await?)) * 1000),
                // Eviction hints; the target starts its own.
                op::IDLE => drop(self.len().await?),
                op::FREQ => drop(self.byte().await?),
                op::AUX => {
                    self.string().await?;
                    self.string().await?;
                }
                op::SLOT_INFO => {
                    for _ in 0..3 {
                        self.len().await?;
                    }
                }
                op::MODULE_AUX => {
                    let module = self.len().await?;
                    warn!(module, "the snapshot holds a module's global data, which is not copied");
                    self.skip_module_value().await?;
                }
                op::FUNCTION2 => return Ok(Entry::Function(self.string().await?)),
                op::FUNCTION_PRE_GA => return Err(self.malformed("functions from a Redis 7.0 release candidate")),
                kind::STRING => {
                    let key = self.string().await?;
                    let value = self.string().await?;
                    return Ok(Entry::String(KeyEntry { db: self.db, key, expire_at_ms, value }));
                }
                value_type => {
                    let key = self.string().await?;
                    self.capture = Some(vec![value_type]);
                    self.skip_value(value_type).await?;
                    let value = self.capture.take().unwrap_or_default();
                    if value.len() > MAX_BULK_LEN {
                        return Err(self.malformed(format!(
                            "the value of key {} is {} bytes, more than one RESTORE can carry",
                            key.escape_ascii(),
                            value.len()
                        )));
                    }
                    return Ok(Entry::Object(KeyEntry { db: self.db, key, expire_at_ms, value }));
                }
            }
        }
    }

    /// The checksum after the EOF opcode, then the framing's end.
    async fn finish(&mut self) -> Result<(), ReplicateError> {
        let expected = std::mem::replace(&mut self.digest, CRC64.digest()).finalize();
        if self.version >= 5 {
            let sent = u64::from_le_bytes(self.array_unsummed().await?);
            // A source with `rdbchecksum no` sends 0.
            if sent != 0 && sent != expected {
                return Err(self.malformed(format!("checksum {sent:#x} does not match the data ({expected:#x})")));
            }
        }
        match self.framing.clone() {
            Framing::Length(len) if len != self.consumed => {
                Err(self.malformed(format!("the RDB ended before the {len} bytes announced")))
            }
            Framing::Length(_) => Ok(()),
            Framing::EofMark(mark) => {
                let matches = self.take_unsummed(mark.len(), |end| end == mark).await?;
                if matches { Ok(()) } else { Err(self.malformed("the end mark does not match")) }
            }
        }
    }

    /// Skips one value of `value_type`, capturing its bytes.
    async fn skip_value(&mut self, value_type: u8) -> Result<(), ReplicateError> {
        match value_type {
            kind::HASH_ZIPMAP
            | kind::LIST_ZIPLIST
            | kind::SET_INTSET
            | kind::ZSET_ZIPLIST
            | kind::HASH_ZIPLIST
            | kind::HASH_LISTPACK
            | kind::ZSET_LISTPACK
            | kind::SET_LISTPACK => self.skip_string().await,
            kind::LIST | kind::SET | kind::LIST_QUICKLIST => {
                for _ in 0..self.len().await? {
                    self.skip_string().await?;
                }
                Ok(())
            }
            kind::HASH => {
                for _ in 0..self.len().await? {
                    self.skip_string().await?;
                    self.skip_string().await?;
                }
                Ok(())
            }
            kind::ZSET => {
                for _ in 0..self.len().await? {
                    self.skip_string().await?;
                    // A score as text: a length byte, or 253/254/255 for nan/+inf/-inf.
                    let len = self.byte().await?;
                    if len < 253 {
                        self.skip(usize::from(len)).await?;
                    }
                }
                Ok(())
            }
            kind::ZSET_2 => {
                for _ in 0..self.len().await? {
                    self.skip_string().await?;
                    self.skip(8).await?;
                }
                Ok(())
            }
            kind::LIST_QUICKLIST_2 => {
                for _ in 0..self.len().await? {
                    self.len().await?; // container: plain or packed
                    self.skip_string().await?;
                }
                Ok(())
            }
            kind::MODULE_2 => {
                self.len().await?; // module id
                self.skip_module_value().await
            }
            kind::STREAM_LISTPACKS | kind::STREAM_LISTPACKS_2 | kind::STREAM_LISTPACKS_3 => {
                self.skip_stream(value_type).await
            }
            other => Err(self.malformed(format!(
                "value type {other} is not supported (a module value of the old format, or a Redis newer than 7.2)"
            ))),
        }
    }

    /// A stream: its listpack nodes, metadata and consumer groups (`rdbLoadObject`).
    async fn skip_stream(&mut self, value_type: u8) -> Result<(), ReplicateError> {
        let v2 = value_type >= kind::STREAM_LISTPACKS_2;
        for _ in 0..self.len().await? {
            self.skip_string().await?; // master ID
            self.skip_string().await?; // listpack
        }
        // length, last ID; in v2 also first ID, max deleted ID, entries added.
        for _ in 0..if v2 { 8 } else { 3 } {
            self.len().await?;
        }
        for _ in 0..self.len().await? {
            self.skip_string().await?; // group name
            for _ in 0..if v2 { 3 } else { 2 } {
                self.len().await?; // last delivered ID, entries read
            }
            for _ in 0..self.len().await? {
                self.skip(16 + 8).await?; // raw ID, delivery time
                self.len().await?; // delivery count
            }
            for _ in 0..self.len().await? {
                self.skip_string().await?; // consumer name
                self.skip(if value_type >= kind::STREAM_LISTPACKS_3 { 16 } else { 8 }).await?; // seen/active time
                let pending = self.len().await?;
                let bytes = pending.checked_mul(16).ok_or_else(|| self.malformed("consumer PEL too long"))?;
                self.skip(self.size(bytes)?).await?;
            }
        }
        Ok(())
    }

    /// A module value: opcode-tagged data up to the EOF opcode.
    async fn skip_module_value(&mut self) -> Result<(), ReplicateError> {
        loop {
            match self.len().await? {
                module_op::EOF => return Ok(()),
                module_op::SINT | module_op::UINT => drop(self.len().await?),
                module_op::FLOAT => self.skip(4).await?,
                module_op::DOUBLE => self.skip(8).await?,
                module_op::STRING => self.skip_string().await?,
                other => return Err(self.malformed(format!("unknown module value opcode {other}"))),
            }
        }
    }

    async fn length(&mut self) -> Result<Length, ReplicateError> {
        let first = self.byte().await?;
        Ok(match first >> 6 {
            0 => Length::Len(u64::from(first & 0x3f)),
            1 => Length::Len(u64::from(first & 0x3f) << 8 | u64::from(self.byte().await?)),
            2 if first == 0x80 => Length::Len(u64::from(u32::from_be_bytes(self.array().await?))),
            2 if first == 0x81 => Length::Len(u64::from_be_bytes(self.array().await?)),
            2 => return Err(self.malformed(format!("unknown length encoding {first:#x}"))),
            _ => Length::Encoded(first & 0x3f),
        })
    }

    pub(crate) async fn len(&mut self) -> Result<u64, ReplicateError> {
        match self.length().await? {
            Length::Len(n) => Ok(n),
            Length::Encoded(_) => Err(self.malformed("a string encoding where a length belongs")),
        }
    }

    /// A string, decoded (integers as decimal text, LZF decompressed).
    pub(crate) async fn string(&mut self) -> Result<Vec<u8>, ReplicateError> {
        match self.length().await? {
            Length::Len(n) => self.take(self.size(n)?, <[u8]>::to_vec).await,
            Length::Encoded(0) => Ok(i8::from_le_bytes(self.array().await?).to_string().into_bytes()),
            Length::Encoded(1) => Ok(i16::from_le_bytes(self.array().await?).to_string().into_bytes()),
            Length::Encoded(2) => Ok(i32::from_le_bytes(self.array().await?).to_string().into_bytes()),
            Length::Encoded(3) => {
                let (compressed, plain) = (self.len().await?, self.len().await?);
                let (compressed, plain) = (self.size(compressed)?, self.size(plain)?);
                let decompressed = self.take(compressed, |data| lzf_decompress(data, plain)).await?;
                decompressed.map_err(|err| self.malformed(format!("LZF string: {err}")))
            }
            Length::Encoded(other) => Err(self.malformed(format!("unknown string encoding {other}"))),
        }
    }

    /// A string, skipped without decoding (its bytes are captured as they are).
    async fn skip_string(&mut self) -> Result<(), ReplicateError> {
        let skip = match self.length().await? {
            Length::Len(n) => n,
            Length::Encoded(0) => 1,
            Length::Encoded(1) => 2,
            Length::Encoded(2) => 4,
            Length::Encoded(3) => {
                let compressed = self.len().await?;
                self.len().await?;
                compressed
            }
            Length::Encoded(other) => return Err(self.malformed(format!("unknown string encoding {other}"))),
        };
        self.skip(self.size(skip)?).await
    }

    /// A length as a byte count this process can hold.
    fn size(&self, n: u64) -> Result<usize, ReplicateError> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_BULK_LEN)
            .ok_or_else(|| self.malformed(format!("a length of {n} bytes is beyond what Redis allows")))
    }

    pub(crate) async fn byte(&mut self) -> Result<u8, ReplicateError> {
        self.take(1, |bytes| bytes[0]).await
    }

    pub(crate) async fn array<const N: usize>(&mut self) -> Result<[u8; N], ReplicateError> {
        self.take(N, |bytes| bytes.try_into().unwrap_or([0; N])).await
    }

    async fn array_unsummed<const N: usize>(&mut self) -> Result<[u8; N], ReplicateError> {
        self.take_unsummed(N, |bytes| bytes.try_into().unwrap_or([0; N])).await
    }

    async fn skip(&mut self, n: usize) -> Result<(), ReplicateError> {
        self.take(n, |_| ()).await
    }

    /// Takes `n` RDB bytes: checksummed, counted, and captured while a value is being read.
    /// `read` sees them in the feed's buffer, so nothing is copied that the caller does not
    /// keep (most fields are a few bytes, read millions of times).
    async fn take<T>(&mut self, n: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, ReplicateError> {
        self.buffer(n).await?;
        let buffer = self.feed.buffer();
        let bytes = &buffer[..n];
        self.digest.update(bytes);
        if let Some(capture) = &mut self.capture {
            capture.extend_from_slice(bytes);
        }
        let value = read(bytes);
        buffer.advance(n);
        Ok(value)
    }

    /// Takes `n` bytes that the checksum does not cover (the trailer, the end mark).
    async fn take_unsummed<T>(&mut self, n: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, ReplicateError> {
        self.buffer(n).await?;
        let buffer = self.feed.buffer();
        let value = read(&buffer[..n]);
        buffer.advance(n);
        Ok(value)
    }

    /// Makes the feed's buffer hold the next `n` bytes, and counts them as consumed.
    async fn buffer(&mut self, n: usize) -> Result<(), ReplicateError> {
        if let Framing::Length(len) = self.framing
            && self.consumed + n as u64 > len
        {
            return Err(self.malformed(format!("a field runs past the {len} bytes announced")));
        }
        while self.feed.buffer().len() < n {
            let missing = n - self.feed.buffer().len();
            self.feed.fill(missing).await?;
        }
        self.consumed += n as u64;
        Ok(())
    }
}

/// Decompresses an LZF string (`lzf_d.c`) that must come to `len` bytes. Written here rather
/// than taken from a crate that zeroes the output first and copies back references a byte at
/// a time: snapshots of small strings are mostly such strings, and Eden decodes every one.
fn lzf_decompress(data: &[u8], len: usize) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(len);
    let mut at = 0;
    while let Some(&control) = data.get(at) {
        let control = usize::from(control);
        at += 1;
        if control < 32 {
            // A literal: the next control + 1 bytes.
            let literal = data.get(at..at + control + 1).ok_or("a literal runs past the data")?;
            if out.len() + literal.len() > len {
                return Err("longer than announced");
            }
            out.extend_from_slice(literal);
            at += literal.len();
            continue;
        }
        // A back reference: length - 2 in 3 bits (7: plus the next byte), distance - 1 in 13.
        let mut n = control >> 5;
        if n == 7 {
            n += usize::from(*data.get(at).ok_or("a reference runs past the data")?);
            at += 1;
        }
        let low = usize::from(*data.get(at).ok_or("a reference runs past the data")?);
        at += 1;
        let distance = ((control & 0x1f) << 8 | low) + 1;
        let start = out.len().checked_sub(distance).ok_or("a reference before the start")?;
        let mut left = n + 2;
        if out.len() + left > len {
            return Err("longer than announced");
        }
        // A reference may overlap what it produces (a run); its output repeats with period
        // `distance`, so copying from `start` as much as is there stays in step, doubling.
        while left > 0 {
            let piece = left.min(out.len() - start);
            out.extend_from_within(start..start + piece);
            left -= piece;
        }
    }
    if out.len() == len { Ok(out) } else { Err("shorter than announced") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal RDB: a string with an expiry, an LZF-free list, a function, the trailer.
    fn sample() -> Vec<u8> {
        let mut rdb = b"REDIS0010".to_vec();
        rdb.extend([op::AUX, 3, b'a', b'b', b'c', 0xc0, 7]); // aux "abc" = int8 7
        rdb.extend([op::SELECTDB, 2, op::RESIZEDB, 2, 1]);
        rdb.push(op::EXPIRETIME_MS);
        rdb.extend(1_900_000_000_000u64.to_le_bytes());
        rdb.extend([kind::STRING, 1, b'k', 2, b'h', b'i']);
        rdb.extend([kind::LIST, 1, b'l', 2, 1, b'a', 0xc1, 0x39, 0x30]); // ["a", 12345]
        rdb.extend([op::FUNCTION2, 4, b'c', b'o', b'd', b'e']);
        rdb.push(op::EOF);
        let crc = CRC64.checksum(&rdb);
        rdb.extend(crc.to_le_bytes());
        rdb
    }

    async fn read_all(rdb: &[u8], framing: Framing) -> Result<Vec<Entry>, ReplicateError> {
        let mut feed = Memory(BytesMut::from(rdb));
        let mut snapshot = Snapshot::open(&mut feed, framing).await?;
        let mut entries = Vec::new();
        loop {
            match snapshot.next().await? {
                Entry::End => return Ok(entries),
                entry => entries.push(entry),
            }
        }
    }

    #[tokio::test]
    async fn finds_keys_values_and_functions() {
        let rdb = sample();
        let entries = read_all(&rdb, Framing::Length(rdb.len() as u64)).await.unwrap();
        assert!(matches!(entries[0], Entry::DbSize(2)));
        let Entry::String(string) = &entries[1] else { panic!("{entries:?}") };
        assert_eq!((string.db, &string.key[..], string.expire_at_ms), (2, &b"k"[..], Some(1_900_000_000_000)));
        assert_eq!(string.value, b"hi");
        let Entry::Object(list) = &entries[2] else { panic!("{entries:?}") };
        assert_eq!((list.expire_at_ms, list.value.len()), (None, 7));
        assert!(matches!(&entries[3], Entry::Function(code) if code == b"code"));

        let mut with_mark = rdb.clone();
        with_mark.extend([b'x'; 40]);
        assert_eq!(read_all(&with_mark, Framing::EofMark(vec![b'x'; 40])).await.unwrap().len(), 4);
    }

    #[test]
    fn lzf_strings_decompress_as_compressed() {
        let random: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut zeros_after_text = b"value:1".to_vec();
        zeros_after_text.resize(100, 0);
        let inputs = [b"abcdefgh".repeat(100), b"xyz".repeat(300), zeros_after_text, vec![7; 70_000], random];
        for plain in inputs {
            let Ok(compressed) = lzf::compress(&plain) else { continue };
            assert_eq!(lzf_decompress(&compressed, plain.len()).unwrap(), plain);
            assert!(lzf_decompress(&compressed, plain.len() - 1).is_err());
            assert!(lzf_decompress(&compressed, plain.len() + 1).is_err());
            assert!(lzf_decompress(&compressed[..compressed.len() - 1], plain.len()).is_err());
        }
        // A reference to before the start, a literal past the end.
        assert!(lzf_decompress(&[0x20, 0x00], 3).is_err());
        assert!(lzf_decompress(&[0x05, b'a'], 6).is_err());
    }

    #[tokio::test]
    async fn malformed_snapshots_are_errors() {
        let rdb = sample();
        let mut corrupt = rdb.clone();
        corrupt[30] ^= 0x40;
        let truncated = &rdb[..rdb.len() - 12];
        let mut bad_type = rdb[..9].to_vec();
        bad_type.extend([99, 1, b'k', 0]);
        let cases: [(&[u8], Framing); 5] = [
            (&corrupt, Framing::Length(rdb.len() as u64)),
            (truncated, Framing::Length(rdb.len() as u64)),
            (&rdb, Framing::Length(rdb.len() as u64 - 1)),
            (&rdb, Framing::EofMark(vec![b'x'; 40])),
            (&bad_type, Framing::Length(100)),
        ];
        for (bytes, framing) in cases {
            assert!(read_all(bytes, framing.clone()).await.is_err(), "{framing:?}");
        }
        // A length far beyond anything Redis allows is refused before any allocation.
        let mut huge = rdb[..9].to_vec();
        huge.extend([kind::STRING, 1, b'k', 0x81]);
        huge.extend(u64::MAX.to_be_bytes());
        let err = read_all(&huge, Framing::Length(1 << 40)).await.unwrap_err();
        assert!(err.to_string().contains("beyond"), "{err}");
    }
}
