//! A big stream copied in chunks: the entries come over as XADDs with their own IDs
//! ([`entries`]), and everything else a stream is made of follows once they are all in
//! ([`copy_state`]): its last ID and counters, its consumer groups with their positions, their
//! consumers, and each group's pending entries with their owner, idle time and delivery count.
//!
//! What cannot be carried over: a consumer's seen-time (it restarts at the copy), and pending
//! entries whose message was already deleted (XCLAIM only claims messages that exist).

use redis::{Pipeline, Value, cmd, pipe};

use super::ReplicateError;
use super::endpoint::{Endpoint, as_bytes, as_int};

/// XADDs recreating one XRANGE chunk (`[id, [field, value, ...]]` entries) in `key`.
pub(crate) fn entries(source: &Endpoint, key: &[u8], chunk: &[Value]) -> Result<Pipeline, ReplicateError> {
    let mut write = pipe();
    for entry in chunk {
        let (Some(id), Some(Value::Array(fields))) = (entry_part(entry, 0).and_then(as_bytes), entry_part(entry, 1))
        else {
            return Err(source.unexpected("XRANGE", entry));
        };
        let add = write.cmd("XADD").arg(key).arg(id);
        for field in fields {
            add.arg(as_bytes(field).ok_or_else(|| source.unexpected("XRANGE", field))?);
        }
    }
    Ok(write)
}

fn entry_part(entry: &Value, index: usize) -> Option<&Value> {
    match entry {
        Value::Array(parts) => parts.get(index),
        _ => None,
    }
}

/// Gives `copy` (already holding every entry of `key`) the source's last ID, counters, consumer
/// groups, consumers and pending entries. `chunk` bounds the pending entries read at once.
pub(crate) async fn copy_state(
    source: &Endpoint,
    target: &Endpoint,
    key: &[u8],
    copy: &[u8],
    chunk: usize,
) -> Result<(), ReplicateError> {
    let info: Value = source.cmd("XINFO STREAM", cmd("XINFO").arg("STREAM").arg(key)).await?;
    let info = Fields::of(source, "XINFO STREAM", &info)?;
    let mut setid = cmd("XSETID");
    setid.arg(copy).arg(info.bytes("last-generated-id")?);
    // Redis 7 keeps counters that consumer-group lag is computed from.
    if let (Ok(added), Ok(max_deleted)) = (info.int("entries-added"), info.bytes("max-deleted-entry-id")) {
        setid.arg("ENTRIESADDED").arg(added).arg("MAXDELETEDID").arg(max_deleted);
    }
    target.cmd::<()>("XSETID", &setid).await?;

    let groups: Vec<Value> = source.cmd("XINFO GROUPS", cmd("XINFO").arg("GROUPS").arg(key)).await?;
    for group in &groups {
        let group = Fields::of(source, "XINFO GROUPS", group)?;
        let name = group.bytes("name")?;
        let mut create = cmd("XGROUP");
        create.arg("CREATE").arg(copy).arg(name).arg(group.bytes("last-delivered-id")?);
        if let Ok(read) = group.int("entries-read") {
            create.arg("ENTRIESREAD").arg(read);
        }
        target.cmd::<()>("XGROUP CREATE", &create).await?;

        let consumers: Vec<Value> =
            source.cmd("XINFO CONSUMERS", cmd("XINFO").arg("CONSUMERS").arg(key).arg(name)).await?;
        let mut recreate = pipe();
        for consumer in &consumers {
            let consumer = Fields::of(source, "XINFO CONSUMERS", consumer)?;
            recreate.cmd("XGROUP").arg("CREATECONSUMER").arg(copy).arg(name).arg(consumer.bytes("name")?);
        }
        for reply in target.pipe("XGROUP CREATECONSUMER", &mut recreate).await? {
            target.ok("XGROUP CREATECONSUMER", reply)?;
        }
        copy_pending(source, target, key, copy, name, chunk).await?;
    }
    Ok(())
}

/// Walks a group's pending entries list and claims each entry on the copy for the same
/// consumer, with its idle time and delivery count.
async fn copy_pending(
    source: &Endpoint,
    target: &Endpoint,
    key: &[u8],
    copy: &[u8],
    group: &[u8],
    chunk: usize,
) -> Result<(), ReplicateError> {
    let mut after = b"-".to_vec();
    loop {
        let pending: Vec<Value> =
            source.cmd("XPENDING", cmd("XPENDING").arg(key).arg(group).arg(&after).arg("+").arg(chunk)).await?;
        let mut claims = pipe();
        for entry in &pending {
            let Value::Array(parts) = entry else { return Err(source.unexpected("XPENDING", entry)) };
            let [id, consumer, idle, deliveries] = parts.as_slice() else {
                return Err(source.unexpected("XPENDING", entry));
            };
            let (Some(id), Some(consumer), Some(idle), Some(deliveries)) =
                (as_bytes(id), as_bytes(consumer), as_int(idle), as_int(deliveries))
            else {
                return Err(source.unexpected("XPENDING", entry));
            };
            claims.cmd("XCLAIM").arg(copy).arg(group).arg(consumer).arg(0).arg(id);
            claims.arg("IDLE").arg(idle).arg("RETRYCOUNT").arg(deliveries).arg("FORCE").arg("JUSTID");
            after = [b"(".as_slice(), id].concat();
        }
        for reply in target.pipe("XCLAIM", &mut claims).await? {
            target.ok("XCLAIM", reply)?;
        }
        if pending.len() < chunk {
            return Ok(());
        }
    }
}

/// A RESP2 reply of alternating names and values (XINFO's maps).
struct Fields<'a> {
    source: &'a Endpoint,
    command: &'static str,
    reply: &'a Value,
    pairs: &'a [Value],
}

impl<'a> Fields<'a> {
    fn of(source: &'a Endpoint, command: &'static str, reply: &'a Value) -> Result<Self, ReplicateError> {
        match reply {
            Value::Array(pairs) if pairs.len() % 2 == 0 => Ok(Fields { source, command, reply, pairs }),
            other => Err(source.unexpected(command, other)),
        }
    }

    fn get(&self, name: &str) -> Result<&'a Value, ReplicateError> {
        let found = self.pairs.chunks(2).find(|pair| as_bytes(&pair[0]) == Some(name.as_bytes()));
        found.map(|pair| &pair[1]).ok_or_else(|| self.source.unexpected(self.command, self.reply))
    }

    fn bytes(&self, name: &str) -> Result<&'a [u8], ReplicateError> {
        let value = self.get(name)?;
        as_bytes(value).ok_or_else(|| self.source.unexpected(self.command, value))
    }

    fn int(&self, name: &str) -> Result<i64, ReplicateError> {
        let value = self.get(name)?;
        as_int(value).ok_or_else(|| self.source.unexpected(self.command, value))
    }
}
