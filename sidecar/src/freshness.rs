//! How much of the source the target holds, as this sidecar can tell on its own (DESIGN §9,
//! "Freshness").
//!
//! The replication engine writes a record on the target every few tens of milliseconds
//! (`replicate::FRESHNESS_KEY`): a beat that changes with every write, and the engine's lag
//! when it wrote. This module reads it every [`POLL_EVERY`] and publishes the instant before
//! which every source write is on the target ([`Covered`]). A record is trusted only when its
//! beat differs from the one the previous read saw: it was then written after that read was
//! sent, so at `previous send − lag` (on this sidecar's clock) the target held everything the
//! engine had received. When the engine stops — an operator that crashed, a failed run — no
//! beat changes, that instant stops moving, and target reads stop within the lag guard,
//! whether or not anything else notices. Nothing compares this clock with another process's.
//!
//! The assumption it rests on, and the reason for [`STREAM_MARGIN`]: the engine receives a
//! source write's replication bytes no later than that margin after a sidecar receives the
//! write's reply (both leave the source in the same event-loop turn).

use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::replicate::FreshnessRecord;
use crate::upstream::{Upstream, UpstreamStream};

/// How often the record is read.
pub const POLL_EVERY: Duration = Duration::from_millis(20);
/// See the module's comment.
pub const STREAM_MARGIN: Duration = Duration::from_millis(5);

/// `GET eden:freshness`, as RESP.
const GET_RECORD: &[u8] = b"*2\r\n$3\r\nGET\r\n$14\r\neden:freshness\r\n";

/// Every source write acknowledged before this instant is on the target; `None` until two
/// beats were seen.
pub type Covered = watch::Receiver<Option<Instant>>;

/// Follows the freshness record on `target` until the returned receiver and its clones are
/// gone.
pub fn follow(target: Upstream) -> Covered {
    let (covered, receiver) = watch::channel(None);
    tokio::spawn(async move {
        let mut connection: Option<UpstreamStream> = None;
        let mut previous: Option<(Instant, Option<u64>)> = None;
        let mut ticker = tokio::time::interval(POLL_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !covered.is_closed() {
            ticker.tick().await;
            let sent = Instant::now();
            let read = tokio::time::timeout(POLL_EVERY * 5, read_record(&target, &mut connection)).await;
            let Ok(Ok(record)) = read else {
                // Unknown: the next read must see a beat of its own before anything is trusted.
                connection = None;
                previous = None;
                continue;
            };
            let beat = record.map(|r| r.beat);
            if let (Some((previous_sent, previous_beat)), Some(record)) = (previous, record)
                && previous_beat != beat
                && let Some(lag) = record.lag_ms
            {
                let at = previous_sent.checked_sub(Duration::from_millis(lag));
                covered.send_if_modified(|current| {
                    let moved = at > *current;
                    if moved {
                        *current = at;
                    }
                    moved
                });
            }
            previous = Some((sent, beat));
        }
    });
    receiver
}

/// One `GET` of the record over `connection`, opened first when there is none.
async fn read_record(
    target: &Upstream,
    connection: &mut Option<UpstreamStream>,
) -> Result<Option<FreshnessRecord>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = match connection {
        Some(stream) => stream,
        None => connection.insert(target.connect().await?),
    };
    stream.write_all(GET_RECORD).await?;
    let mut buffer = BytesMut::with_capacity(64);
    loop {
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err("the target closed the connection".into());
        }
        match decode_bytes_mut(&mut buffer)? {
            Some((BytesFrame::BulkString(text), _, _)) => return Ok(FreshnessRecord::decode(&text)),
            Some((BytesFrame::Null, _, _)) => return Ok(None),
            Some((other, _, _)) => return Err(format!("unexpected reply to GET: {other:?}").into()),
            None if buffer.len() > 1024 => return Err("reply too long for a freshness record".into()),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_request_reads_the_engines_record() {
        let key = crate::replicate::FRESHNESS_KEY;
        assert_eq!(super::GET_RECORD, format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes());
    }
}
