//! A shallow, streaming reader of the RDB snapshot a source sends its replica.
//!
//! Eden does not rebuild values from the RDB. It only finds where each key's encoded value
//! begins and ends, and hands those bytes on untouched: an RDB value is byte for byte the body
//! of a `DUMP` payload, so the target's own `RESTORE` decodes it, whatever the encoding
//! (listpack, quicklist, intset, stream, module value). That keeps this reader small — lengths,
//! strings, and the nesting of each type — and keeps memory at one value, however big the
//! snapshot. Strings are the exception: they are decoded (a string is one field), because the
//! target stores a plain string from `MSET` for half the work of a `RESTORE`, and any server
//! takes `SET`, whatever RDB version it reads.
//!
//! Big values are the other exception ([`Entry::Big`]): a value is captured only up to the
//! big-value threshold. A string whose length (read before its bytes) is over it, and a list,
//! set, sorted set, hash or stream whose bytes pass it while they are read, is handed on as a
//! [`Big`] that yields its content a piece at a time ([`Walk`]): the pieces captured before the
//! threshold was passed are decoded again from the capture, the rest straight from the feed.
//! A piece is one element (or pair) of a plain encoding, one quicklist node, one encoded blob
//! (listpack, ziplist, intset: each bounded by the source's `*-max-*-entries`/`-value`
//! settings), one stream node as `XADD`s (then the stream's counters, groups, consumers and
//! pending entries as commands), or at most [`STRING_PIECE`] bytes of a string
//! (LZF-compressed ones are decompressed as they arrive, keeping the 8 KiB window back
//! references reach). So memory holds the threshold plus one piece, however big the value.
//! Module values have no such form and are captured whole, as before.
//!
//! The reader pulls from a [`Feed`] (the replication link) exactly the bytes the RDB occupies,
//! so whatever follows in the buffer (the command stream) is left for the stream applier. It
//! checks the RDB's own CRC64 as it goes. Anything malformed is an error, never a panic.

use bytes::{Buf, Bytes, BytesMut};
use crc::{CRC_64_REDIS, Crc, Digest, Table};
use tracing::warn;

use super::decode::{intset, listpack, ziplist};
use crate::frame::MAX_BULK_LEN;
use crate::replicate::ReplicateError;

/// The most bytes of a big string one piece carries: well under the smallest
/// `proto-max-bulk-len` a server accepts (1 MB), so each piece is one `APPEND`.
pub(crate) const STRING_PIECE: usize = 256 << 10;

/// How far back an LZF back reference reaches (13 bits of distance, plus one).
const LZF_WINDOW: usize = 8 << 10;

/// Compressed bytes of a big string read at a time.
const LZF_READ: usize = 64 << 10;

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
        &mut self.conn.buf
    }

    async fn fill(&mut self, want: usize) -> Result<usize, ReplicateError> {
        super::link::Link::fill(self, want).await
    }
}

/// A feed over bytes already in memory (one value being decoded); running out is an error.
#[derive(Debug)]
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
    /// A value over the big-value threshold, read a piece at a time ([`Big::next`]) before
    /// the next entry.
    Big(Big),
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
    /// An integer of this many bytes, stored as a string.
    Int(usize),
    /// An LZF-compressed string.
    Lzf {
        compressed: u64,
        plain: u64,
    },
}

impl Length {
    /// The string's length once decoded (an integer's text is short: it counts as nothing).
    fn plain(&self) -> u64 {
        match self {
            Length::Len(n) | Length::Lzf { plain: n, .. } => *n,
            Length::Int(_) => 0,
        }
    }
}

/// What one piece of a big value adds to it.
#[derive(Debug)]
pub(crate) enum Piece {
    /// Elements for the value type's adding command, flat (a hash's field then value, a sorted
    /// set's member then score as text; a string's next bytes).
    Elements(Vec<Vec<u8>>),
    /// Whole commands on the key (a stream's entries, then its counters, groups, consumers and
    /// pending entries): each its command words, then the key, then these arguments.
    Commands(Vec<KeyCommand>),
}

/// A command on the key being built: its words, the key, its arguments.
pub(crate) type KeyCommand = (&'static [&'static [u8]], Vec<Vec<u8>>);

/// A value over the big-value threshold ([`Entry::Big`]): its key, and its elements to come.
#[derive(Debug)]
pub(crate) struct Big {
    /// Key, database and expiry; `value` is empty.
    pub(crate) entry: KeyEntry,
    /// The value type (`kind`): a string, or a type [`Walk::walks`].
    pub(crate) kind: u8,
    /// The bytes read before the value turned out big (without the type byte), and the walk
    /// that decodes the pieces they hold, how many pieces.
    replay: Option<(Memory, Walk, usize)>,
    /// Where the rest of the value stands in the feed.
    walk: Walk,
}

impl Big {
    /// The next piece; `None` once the value is over. Must be read to its end before the
    /// snapshot's next entry.
    pub(crate) async fn next<F: Feed>(&mut self, rdb: &mut Snapshot<'_, F>) -> Result<Option<Piece>, ReplicateError> {
        if let Some((memory, walk, left)) = &mut self.replay {
            if *left > 0 {
                *left -= 1;
                let len = memory.0.len();
                return walk.next(&mut Snapshot::value(memory, len), true).await;
            }
            self.replay = None;
        }
        self.walk.next(rdb, true).await
    }
}

/// Reads one value of a walkable type a piece at a time, decoding the pieces or skipping them
/// (captured, while the value may still be small).
#[derive(Debug)]
pub(crate) struct Walk {
    kind: u8,
    state: WalkState,
}

#[derive(Debug)]
enum WalkState {
    Start,
    /// Items left: elements, pairs or quicklist nodes.
    Items(u64),
    /// A stream's listpack nodes left, then its metadata and groups.
    StreamNodes(u64),
    StreamMeta,
    /// A string's raw bytes left.
    Raw(u64),
    /// An LZF string being decompressed: compressed bytes not read yet, plain bytes not produced
    /// yet, compressed bytes read but not decoded, and the output's last [`LZF_WINDOW`] bytes.
    Lzf {
        compressed: u64,
        plain: u64,
        pending: Vec<u8>,
        window: Vec<u8>,
    },
    Done,
}

impl Walk {
    pub(crate) fn new(kind: u8) -> Self {
        Walk { kind, state: WalkState::Start }
    }

    /// Whether values of this type have a form in pieces: lists, sets, sorted sets and hashes,
    /// in every encoding but the ancient zipmap, and streams.
    pub(crate) fn walks(kind: u8) -> bool {
        matches!(
            kind,
            kind::LIST
                | kind::SET
                | kind::ZSET
                | kind::HASH
                | kind::ZSET_2
                | kind::LIST_ZIPLIST
                | kind::SET_INTSET
                | kind::ZSET_ZIPLIST
                | kind::HASH_ZIPLIST
                | kind::LIST_QUICKLIST
                | kind::HASH_LISTPACK
                | kind::ZSET_LISTPACK
                | kind::LIST_QUICKLIST_2
                | kind::SET_LISTPACK
                | kind::STREAM_LISTPACKS
                | kind::STREAM_LISTPACKS_2
                | kind::STREAM_LISTPACKS_3
        )
    }

    /// A big string's bytes, after its length.
    fn string(length: Length) -> Self {
        let state = match length {
            Length::Lzf { compressed, plain } => {
                WalkState::Lzf { compressed, plain, pending: Vec::new(), window: Vec::new() }
            }
            other => WalkState::Raw(other.plain()),
        };
        Walk { kind: kind::STRING, state }
    }

    /// The next piece: what it adds when `decode`, else nothing (its bytes skipped, and
    /// captured if the snapshot captures); `None` at the value's end. Both ways count the same
    /// pieces.
    pub(crate) async fn next<F: Feed>(
        &mut self,
        rdb: &mut Snapshot<'_, F>,
        decode: bool,
    ) -> Result<Option<Piece>, ReplicateError> {
        loop {
            match &mut self.state {
                WalkState::Done => return Ok(None),
                WalkState::Start => match self.kind {
                    kind::LIST
                    | kind::SET
                    | kind::ZSET
                    | kind::HASH
                    | kind::ZSET_2
                    | kind::LIST_QUICKLIST
                    | kind::LIST_QUICKLIST_2 => self.state = WalkState::Items(rdb.len().await?),
                    kind::STREAM_LISTPACKS | kind::STREAM_LISTPACKS_2 | kind::STREAM_LISTPACKS_3 => {
                        self.state = WalkState::StreamNodes(rdb.len().await?)
                    }
                    blob => {
                        self.state = WalkState::Done;
                        return Ok(Some(Piece::Elements(rdb.blob(blob, decode).await?)));
                    }
                },
                WalkState::Items(0) | WalkState::Raw(0) => self.state = WalkState::Done,
                WalkState::Items(left) => {
                    *left -= 1;
                    return Ok(Some(Piece::Elements(rdb.item(self.kind, decode).await?)));
                }
                WalkState::StreamNodes(0) => self.state = WalkState::StreamMeta,
                WalkState::StreamNodes(left) => {
                    *left -= 1;
                    return Ok(Some(rdb.stream_node(decode).await?));
                }
                WalkState::StreamMeta => {
                    self.state = WalkState::Done;
                    return Ok(Some(rdb.stream_meta(self.kind, decode).await?));
                }
                WalkState::Raw(left) => {
                    let n = (*left).min(STRING_PIECE as u64);
                    *left -= n;
                    return Ok(Some(Piece::Elements(vec![rdb.take(n as usize, <[u8]>::to_vec).await?])));
                }
                WalkState::Lzf { compressed, plain, pending, window } => {
                    // Decode up to a piece's worth, reading more compressed bytes as needed: a
                    // piece is bounded in what it produces, since a few bytes of input can
                    // stand for hundreds of output bytes.
                    let start = window.len();
                    let max = start + usize::try_from(*plain).unwrap_or(usize::MAX);
                    loop {
                        let used = lzf_decode(pending, window, max, start + STRING_PIECE)
                            .map_err(|err| rdb.malformed(format!("LZF string: {err}")))?;
                        pending.drain(..used);
                        if window.len() - start >= STRING_PIECE || *compressed == 0 {
                            break;
                        }
                        let n = (*compressed).min(LZF_READ as u64);
                        *compressed -= n;
                        rdb.take(n as usize, |bytes| pending.extend_from_slice(bytes)).await?;
                    }
                    let piece = window.split_off(start);
                    *plain -= piece.len() as u64;
                    if piece.is_empty() {
                        if *plain > 0 || !pending.is_empty() {
                            return Err(rdb.malformed("LZF string: shorter than announced, or cut short"));
                        }
                        self.state = WalkState::Done;
                        return Ok(None);
                    }
                    // Keep what later back references may reach.
                    window.extend_from_slice(&piece[piece.len().saturating_sub(LZF_WINDOW)..]);
                    window.drain(..window.len().saturating_sub(LZF_WINDOW));
                    return Ok(Some(Piece::Elements(vec![piece])));
                }
            }
        }
    }
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
    /// Values of more bytes than this are handed on as [`Entry::Big`].
    big_value_bytes: usize,
}

impl<'a, F: Feed> Snapshot<'a, F> {
    /// Reads the `REDISnnnn` header. Values of more than `big_value_bytes` come as
    /// [`Entry::Big`].
    pub(crate) async fn open(
        feed: &'a mut F,
        framing: Framing,
        big_value_bytes: usize,
    ) -> Result<Self, ReplicateError> {
        let mut snapshot = Snapshot::value(feed, 0);
        snapshot.framing = framing;
        snapshot.big_value_bytes = big_value_bytes;
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
        Snapshot {
            feed,
            framing,
            consumed: 0,
            digest: CRC64.digest(),
            capture: None,
            version: 0,
            db: 0,
            big_value_bytes: usize::MAX,
        }
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
                    let length = self.length().await?;
                    let entry = KeyEntry { db: self.db, key, expire_at_ms, value: Vec::new() };
                    if length.plain() > self.big_value_bytes as u64 {
                        let walk = Walk::string(length);
                        return Ok(Entry::Big(Big { entry, kind: kind::STRING, replay: None, walk }));
                    }
                    let value = self.string_from(length).await?;
                    return Ok(Entry::String(KeyEntry { value, ..entry }));
                }
                value_type if Walk::walks(value_type) => {
                    let key = self.string().await?;
                    let entry = KeyEntry { db: self.db, key, expire_at_ms, value: Vec::new() };
                    self.capture = Some(vec![value_type]);
                    let mut walk = Walk::new(value_type);
                    let mut pieces = 0;
                    while walk.next(self, false).await?.is_some() {
                        pieces += 1;
                        if self.capture.as_ref().is_some_and(|c| c.len() > self.big_value_bytes) {
                            // Moved, not copied (a unique `Bytes` becomes a `BytesMut` as is).
                            let mut captured = BytesMut::from(Bytes::from(self.capture.take().unwrap_or_default()));
                            captured.advance(1); // the type byte
                            let replay = Memory(captured);
                            let replay = Some((replay, Walk::new(value_type), pieces));
                            return Ok(Entry::Big(Big { entry, kind: value_type, replay, walk }));
                        }
                    }
                    let value = self.capture.take().unwrap_or_default();
                    return Ok(Entry::Object(KeyEntry { value, ..entry }));
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

    /// Skips one value of a type [`Walk`] does not read (zipmap, module), capturing its bytes.
    async fn skip_value(&mut self, value_type: u8) -> Result<(), ReplicateError> {
        match value_type {
            kind::HASH_ZIPMAP => self.skip_string().await,
            kind::MODULE_2 => {
                self.len().await?; // module id
                self.skip_module_value().await
            }
            other => Err(self.malformed(format!(
                "value type {other} is not supported (a module value of the old format, or a Redis newer than 7.2)"
            ))),
        }
    }

    /// One item of a collection with an item count: an element, a pair, or a quicklist node.
    async fn item(&mut self, value_type: u8, decode: bool) -> Result<Vec<Vec<u8>>, ReplicateError> {
        let mut elements = Vec::new();
        match value_type {
            kind::LIST | kind::SET => self.element(decode, &mut elements).await?,
            kind::HASH => {
                self.element(decode, &mut elements).await?;
                self.element(decode, &mut elements).await?;
            }
            kind::ZSET => {
                self.element(decode, &mut elements).await?;
                // A score as text: a length byte, or 253/254/255 for nan/+inf/-inf.
                let score = match self.byte().await? {
                    253 => return Err(self.malformed("a NaN score")),
                    254 => b"+inf".to_vec(),
                    255 => b"-inf".to_vec(),
                    len => self.take(usize::from(len), |text| text.to_vec()).await?,
                };
                if decode {
                    elements.push(score);
                }
            }
            kind::ZSET_2 => {
                self.element(decode, &mut elements).await?;
                let score = f64::from_le_bytes(self.array().await?);
                if decode {
                    elements.push(score.to_string().into_bytes());
                }
            }
            kind::LIST_QUICKLIST => elements = self.blob(kind::LIST_ZIPLIST, decode).await?,
            _ => {
                // LIST_QUICKLIST_2: each node says whether it is plain (one element) or packed.
                // A packed node is a listpack (any listpack type decodes the same).
                match self.len().await? {
                    2 => elements = self.blob(kind::SET_LISTPACK, decode).await?,
                    _ => self.element(decode, &mut elements).await?,
                }
            }
        }
        Ok(elements)
    }

    /// One string element, decoded into `elements` or skipped.
    async fn element(&mut self, decode: bool, elements: &mut Vec<Vec<u8>>) -> Result<(), ReplicateError> {
        match decode {
            true => elements.push(self.string().await?),
            false => self.skip_string().await?,
        }
        Ok(())
    }

    /// One encoded blob of `value_type`'s encoding (intset, ziplist or listpack), as its
    /// elements when `decode`.
    async fn blob(&mut self, value_type: u8, decode: bool) -> Result<Vec<Vec<u8>>, ReplicateError> {
        if !decode {
            self.skip_string().await?;
            return Ok(Vec::new());
        }
        let blob = self.string().await?;
        match value_type {
            kind::SET_INTSET => intset(&blob),
            kind::LIST_ZIPLIST | kind::ZSET_ZIPLIST | kind::HASH_ZIPLIST => ziplist(&blob),
            _ => listpack(&blob),
        }
    }

    /// One listpack node of a stream: its master ID and listpack, as one `XADD` per entry not
    /// deleted.
    async fn stream_node(&mut self, decode: bool) -> Result<Piece, ReplicateError> {
        if !decode {
            self.skip_string().await?; // master ID
            self.skip_string().await?; // listpack
            return Ok(Piece::Elements(Vec::new()));
        }
        let master = self.string().await?;
        let master = stream_id(&master).ok_or_else(|| self.malformed("a stream node's master ID is not 16 bytes"))?;
        let node = listpack(&self.string().await?)?;
        stream_entries(master, node).map(Piece::Commands).map_err(|detail| self.malformed(detail))
    }

    /// What follows a stream's nodes (`rdbLoadObject`): its length and IDs, then each consumer
    /// group with its pending entries and consumers, as `XSETID`, `XGROUP CREATE`, `XGROUP
    /// CREATECONSUMER` and `XCLAIM … TIME … RETRYCOUNT … FORCE JUSTID` (as scan mode carries a
    /// stream's state, [`crate::replicate::streams`]). A group's pending entries are held while
    /// its consumers are read, to give each claim its delivery time and count.
    async fn stream_meta(&mut self, value_type: u8, decode: bool) -> Result<Piece, ReplicateError> {
        let v2 = value_type >= kind::STREAM_LISTPACKS_2;
        let id = |ms: u64, seq: u64| format!("{ms}-{seq}").into_bytes();
        let mut commands: Vec<KeyCommand> = Vec::new();
        self.len().await?; // length: what the entries make
        let mut setid = vec![id(self.len().await?, self.len().await?)];
        if v2 {
            // The first ID: what the entries make.
            self.len().await?;
            self.len().await?;
            let max_deleted = id(self.len().await?, self.len().await?);
            let added = self.len().await?.to_string().into_bytes();
            setid.extend([b"ENTRIESADDED".to_vec(), added, b"MAXDELETEDID".to_vec(), max_deleted]);
        }
        commands.push((&[b"XSETID"], setid));
        for _ in 0..self.len().await? {
            let group = self.string().await?;
            let mut create = vec![group.clone(), id(self.len().await?, self.len().await?)];
            if v2 {
                // -1 (unknown) is saved as a length of all ones.
                let read = self.len().await? as i64;
                create.extend([b"ENTRIESREAD".to_vec(), read.to_string().into_bytes()]);
            }
            commands.push((&[b"XGROUP", b"CREATE"], create));
            let mut pending = std::collections::HashMap::new();
            for _ in 0..self.len().await? {
                let raw: [u8; 16] = self.array().await?;
                let delivered = u64::from_le_bytes(self.array().await?);
                let count = self.len().await?;
                if decode {
                    pending.insert(raw, (delivered, count));
                }
            }
            for _ in 0..self.len().await? {
                let consumer = self.string().await?;
                self.skip(if value_type >= kind::STREAM_LISTPACKS_3 { 16 } else { 8 }).await?; // seen/active time
                commands.push((&[b"XGROUP", b"CREATECONSUMER"], vec![group.clone(), consumer.clone()]));
                for _ in 0..self.len().await? {
                    let raw: [u8; 16] = self.array().await?;
                    if !decode {
                        continue;
                    }
                    let (ms, seq) = stream_id(&raw).unwrap_or_default();
                    let (delivered, count) = *pending
                        .get(&raw)
                        .ok_or_else(|| self.malformed("a consumer's pending entry is not in its group's"))?;
                    let claim = [
                        group.clone(),
                        consumer.clone(),
                        b"0".to_vec(),
                        id(ms, seq),
                        b"TIME".to_vec(),
                        delivered.to_string().into_bytes(),
                        b"RETRYCOUNT".to_vec(),
                        count.to_string().into_bytes(),
                        b"FORCE".to_vec(),
                        b"JUSTID".to_vec(),
                    ];
                    commands.push((&[b"XCLAIM"], claim.to_vec()));
                }
            }
        }
        Ok(Piece::Commands(if decode { commands } else { Vec::new() }))
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

    /// A length field, or the special string encoding it announces (its lengths read too).
    async fn length(&mut self) -> Result<Length, ReplicateError> {
        Ok(match self.header().await? {
            Ok(n) => Length::Len(n),
            Err(0) => Length::Int(1),
            Err(1) => Length::Int(2),
            Err(2) => Length::Int(4),
            Err(3) => Length::Lzf { compressed: self.len().await?, plain: self.len().await? },
            Err(other) => return Err(self.malformed(format!("unknown string encoding {other}"))),
        })
    }

    /// A plain length.
    pub(crate) async fn len(&mut self) -> Result<u64, ReplicateError> {
        self.header().await?.map_err(|_| self.malformed("a string encoding where a length belongs"))
    }

    /// A length field as it is: a length, or the number of a special string encoding.
    async fn header(&mut self) -> Result<Result<u64, u8>, ReplicateError> {
        let first = self.byte().await?;
        Ok(match first >> 6 {
            0 => Ok(u64::from(first & 0x3f)),
            1 => Ok(u64::from(first & 0x3f) << 8 | u64::from(self.byte().await?)),
            2 if first == 0x80 => Ok(u64::from(u32::from_be_bytes(self.array().await?))),
            2 if first == 0x81 => Ok(u64::from_be_bytes(self.array().await?)),
            2 => return Err(self.malformed(format!("unknown length encoding {first:#x}"))),
            _ => Err(first & 0x3f),
        })
    }

    /// A string, decoded (integers as decimal text, LZF decompressed).
    pub(crate) async fn string(&mut self) -> Result<Vec<u8>, ReplicateError> {
        let length = self.length().await?;
        self.string_from(length).await
    }

    /// The rest of a string whose length was read.
    async fn string_from(&mut self, length: Length) -> Result<Vec<u8>, ReplicateError> {
        match length {
            Length::Len(n) => self.take(self.size(n)?, <[u8]>::to_vec).await,
            Length::Int(1) => Ok(i8::from_le_bytes(self.array().await?).to_string().into_bytes()),
            Length::Int(2) => Ok(i16::from_le_bytes(self.array().await?).to_string().into_bytes()),
            Length::Int(_) => Ok(i32::from_le_bytes(self.array().await?).to_string().into_bytes()),
            Length::Lzf { compressed, plain } => {
                let (compressed, plain) = (self.size(compressed)?, self.size(plain)?);
                let decompressed = self.take(compressed, |data| lzf_decompress(data, plain)).await?;
                decompressed.map_err(|err| self.malformed(format!("LZF string: {err}")))
            }
        }
    }

    /// A string, skipped without decoding (its bytes are captured as they are).
    async fn skip_string(&mut self) -> Result<(), ReplicateError> {
        let skip = match self.length().await? {
            Length::Len(n) | Length::Lzf { compressed: n, .. } => n,
            Length::Int(n) => n as u64,
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

/// A stream ID as Redis stores it raw: milliseconds and sequence, 8 bytes each, big-endian.
fn stream_id(raw: &[u8]) -> Option<(u64, u64)> {
    let raw: &[u8; 16] = raw.try_into().ok()?;
    let (ms, seq) = raw.split_at(8);
    Some((u64::from_be_bytes(ms.try_into().ok()?), u64::from_be_bytes(seq.try_into().ok()?)))
}

/// The `XADD`s of one stream node (`t_stream.c`): a master entry (valid and deleted counts, the
/// master fields, a terminating 0), then each entry as flags, ID offsets from the master ID,
/// its fields and values (only values when it has the master's fields) and an element count.
fn stream_entries(master: (u64, u64), node: Vec<Vec<u8>>) -> Result<Vec<KeyCommand>, String> {
    const DELETED: i64 = 1;
    const SAME_FIELDS: i64 = 2;
    const XADD: &[&[u8]] = &[b"XADD"];
    let mut node = node.into_iter();
    let mut next = || node.next().ok_or_else(|| "a stream node ends early".to_string());
    let int = |element: Vec<u8>| {
        std::str::from_utf8(&element).ok().and_then(|text| text.parse::<i64>().ok()).ok_or("a stream node's number")
    };
    let entries = int(next()?)? + int(next()?)?;
    let fields = int(next()?)?;
    let master_fields = (0..fields).map(|_| next()).collect::<Result<Vec<_>, _>>()?;
    next()?; // the master entry's terminator
    let mut commands = Vec::new();
    for _ in 0..entries {
        let flags = int(next()?)?;
        let ms = master.0.wrapping_add(int(next()?)? as u64);
        let seq = master.1.wrapping_add(int(next()?)? as u64);
        let mut args = vec![format!("{ms}-{seq}").into_bytes()];
        if flags & SAME_FIELDS != 0 {
            for field in &master_fields {
                args.extend([field.clone(), next()?]);
            }
        } else {
            for _ in 0..2 * int(next()?)? {
                args.push(next()?);
            }
        }
        next()?; // the entry's element count
        if flags & DELETED == 0 {
            commands.push((XADD, args));
        }
    }
    Ok(commands)
}

/// Decompresses an LZF string (`lzf_d.c`) that must come to `len` bytes.
fn lzf_decompress(data: &[u8], len: usize) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(len);
    match lzf_decode(data, &mut out, len, usize::MAX)? {
        used if used < data.len() => Err("an instruction runs past the data"),
        _ if out.len() == len => Ok(out),
        _ => Err("shorter than announced"),
    }
}

/// Decodes the complete LZF instructions at the start of `data` onto the end of `out`, which
/// must not grow past `max` bytes, until `out` holds `stop` bytes or more; returns how many
/// bytes of `data` they took (an instruction cut short at the end is left for the caller to
/// complete). Back references reach into what
/// `out` held before. Written here rather than taken from a crate that zeroes the output first
/// and copies back references a byte at a time: snapshots of small strings are mostly such
/// strings, and Eden decodes every one.
fn lzf_decode(data: &[u8], out: &mut Vec<u8>, max: usize, stop: usize) -> Result<usize, &'static str> {
    let mut at = 0;
    while let Some(&control) = data.get(at)
        && out.len() < stop
    {
        let control = usize::from(control);
        if control < 32 {
            // A literal: the next control + 1 bytes.
            let Some(literal) = data.get(at + 1..at + 2 + control) else { break };
            if out.len() + literal.len() > max {
                return Err("longer than announced");
            }
            out.extend_from_slice(literal);
            at += 2 + control;
            continue;
        }
        // A back reference: length - 2 in 3 bits (7: plus the next byte), distance - 1 in 13.
        let long = control >> 5 == 7;
        let Some(&low) = data.get(at + 1 + usize::from(long)) else { break };
        let n = (control >> 5) + if long { usize::from(data[at + 1]) } else { 0 };
        at += 2 + usize::from(long);
        let distance = ((control & 0x1f) << 8 | usize::from(low)) + 1;
        let start = out.len().checked_sub(distance).ok_or("a reference before the start")?;
        let mut left = n + 2;
        if out.len() + left > max {
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
    Ok(at)
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
        let mut snapshot = Snapshot::open(&mut feed, framing, usize::MAX).await?;
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

    /// A snapshot of one string key, its value LZF-compressed, and the value.
    fn compressed_string_rdb() -> (Vec<u8>, Vec<u8>) {
        let words = [&b"alpha "[..], b"beta ", b"gamma ", b"delta ", b"epsilon ", b"zeta ", b"eta "];
        let mut plain = Vec::new();
        let mut seed = 7u64;
        while plain.len() < 2 << 20 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            plain.extend_from_slice(words[(seed >> 59) as usize % words.len()]);
        }
        let compressed = lzf::compress(&plain).unwrap();
        assert!(compressed.len() > 2 * STRING_PIECE, "the compressed bytes span several reads");
        let mut rdb = b"REDIS0010".to_vec();
        rdb.extend([kind::STRING, 1, b's', 0xc3, 0x80]);
        rdb.extend((compressed.len() as u32).to_be_bytes());
        rdb.push(0x80);
        rdb.extend((plain.len() as u32).to_be_bytes());
        rdb.extend(&compressed);
        rdb.push(op::EOF);
        let crc = CRC64.checksum(&rdb);
        rdb.extend(crc.to_le_bytes());
        (rdb, plain)
    }

    /// Past the threshold, a compressed string comes in pieces of at most `STRING_PIECE` bytes,
    /// decompressed across reads (instructions and back references straddle them) to the value.
    #[tokio::test]
    async fn a_big_compressed_string_comes_in_pieces() {
        let (rdb, plain) = compressed_string_rdb();
        let mut feed = Memory(BytesMut::from(&rdb[..]));
        let mut snapshot = Snapshot::open(&mut feed, Framing::Length(rdb.len() as u64), 1 << 20).await.unwrap();
        let Entry::Big(mut big) = snapshot.next().await.unwrap() else { panic!("not big") };
        let mut value = Vec::new();
        while let Some(piece) = big.next(&mut snapshot).await.unwrap() {
            let Piece::Elements(piece) = piece else { panic!("{piece:?}") };
            assert_eq!(piece.len(), 1);
            assert!(piece[0].len() <= STRING_PIECE + 264, "{}", piece[0].len());
            value.extend_from_slice(&piece[0]);
        }
        assert!(value == plain, "the pieces make the value");
        assert!(matches!(snapshot.next().await.unwrap(), Entry::End));

        // Under the threshold it is one string, as before.
        let entries = read_all(&rdb, Framing::Length(rdb.len() as u64)).await.unwrap();
        assert!(matches!(&entries[..], [Entry::String(entry)] if entry.value == plain));
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
