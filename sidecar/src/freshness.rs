//! How much of the source the target holds, as this sidecar can tell on its own (DESIGN §9,
//! "Freshness").
//!
//! The replication engine beats on the target (`replicate::FRESHNESS_KEY`): before each beat it
//! takes a mark on the source and waits until everything before the mark is on the target, and
//! each beat is numbered one above the one before (see `replicate::freshness`). This module
//! reads the record every [`POLL_EVERY`] and publishes [`Fresh`]: the instant before which every
//! source write is on the target, and when that was last confirmed.
//!
//! Why it holds, with reads sent at `a < b < c` on this sidecar's clock, each sent after the
//! previous one's reply: `a` saw something other than beat `X`, `b` saw `X`, `c` sees `Y`, the
//! beat after `X`. So `X` was written after `a` was served, and `Y`'s mark was taken after `X`
//! was acknowledged, hence after `a`: a write whose reply this sidecar had before sending `a`
//! was acknowledged by the source before `Y`'s mark, and `Y` was written (before `c` was
//! served) only once the target held it. Every step is a message received before the next is
//! sent; no clock of another process is read and no delay is assumed. Reads become possible
//! again a few beats after the engine stops passing its marks, and stop when it does: `covered`
//! then stops moving, and the lag guard ends target reads.
//!
//! A claim stays true while the engine only adds the source's writes to the target. The one
//! thing that empties it, a restart's full resync, removes the record first and waits twice
//! [`TRUSTED_FOR`]: a sidecar trusts only within that time of a read that saw the beat it
//! follows, or the next one, and anything else it sees (no record, another run, a number
//! skipped) ends its trust until a new chain of beats is seen.

use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::replicate::{FreshnessRecord, TRUSTED_FOR};
use crate::upstream::{Upstream, UpstreamStream};

/// How often the record is read.
pub const POLL_EVERY: Duration = Duration::from_millis(10);

/// `GET eden:freshness`, as RESP.
const GET_RECORD: &[u8] = b"*2\r\n$3\r\nGET\r\n$14\r\neden:freshness\r\n";

/// What this sidecar knows of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fresh {
    /// Every source write answered before this instant is on the target. Only moves forward.
    pub covered: Instant,
    /// When the last read that saw the beat followed (or the next one) was sent.
    pub confirmed: Instant,
}

impl Fresh {
    /// `covered`, while it is within `max_lag` of now and the record was seen within
    /// [`TRUSTED_FOR`].
    pub fn covered_within(&self, max_lag: Duration) -> Option<Instant> {
        (self.covered.elapsed() <= max_lag && self.confirmed.elapsed() <= TRUSTED_FOR).then_some(self.covered)
    }
}

/// The follower's publication: `None` while nothing is known.
pub type Covered = watch::Receiver<Option<Fresh>>;

/// Follows the freshness record on `target` until the returned receiver and its clones are
/// gone.
pub fn follow(target: Upstream) -> Covered {
    let (published, receiver) = watch::channel(None);
    tokio::spawn(async move {
        let mut connection: Option<UpstreamStream> = None;
        let mut chain = Chain::default();
        let mut ticker = tokio::time::interval(POLL_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !published.is_closed() {
            ticker.tick().await;
            let sent = Instant::now();
            let read = tokio::time::timeout(TRUSTED_FOR, read_record(&target, &mut connection)).await;
            let seen = match read {
                Ok(Ok(record)) => Some(record),
                _ => {
                    connection = None;
                    None
                }
            };
            let fresh = chain.observe(sent, seen);
            published.send_if_modified(|current| std::mem::replace(current, fresh) != fresh);
        }
    });
    receiver
}

/// The beats seen so far, as a pure state machine.
#[derive(Debug, Default)]
struct Chain {
    /// The last read: when it was sent and what it saw; `None` after a failed read.
    previous: Option<(Instant, Option<FreshnessRecord>)>,
    /// The beat followed, and when the last read before the first one that saw it was sent
    /// (it was written after then); `None` when no read before it is known.
    followed: Option<(FreshnessRecord, Option<Instant>)>,
    fresh: Option<Fresh>,
}

impl Chain {
    /// A read sent at `sent` saw `seen` (`None`: the read failed; `Some(None)`: no record).
    fn observe(&mut self, sent: Instant, seen: Option<Option<FreshnessRecord>>) -> Option<Fresh> {
        let Some(seen) = seen else {
            // A read that failed may still be served later: nothing known orders it.
            *self = Chain::default();
            return None;
        };
        let previous = self.previous.replace((sent, seen));
        let Some(record) = seen else {
            (self.followed, self.fresh) = (None, None);
            return None;
        };
        // `record` was written after the previous read was served, if that read saw otherwise.
        let written_after = previous.filter(|(_, before)| *before != Some(record)).map(|(at, _)| at);
        match self.followed {
            Some((followed, _)) if followed == record => {
                if let Some(fresh) = &mut self.fresh {
                    fresh.confirmed = sent;
                }
            }
            Some((followed, Some(covered))) if record.follows(&followed) => {
                self.fresh = Some(Fresh { covered, confirmed: sent });
                self.followed = Some((record, written_after));
            }
            // Also the successor of a beat whose writing time is unknown (the chain's first):
            // nothing is trusted yet, and the chain goes on from `record`.
            _ => {
                self.fresh = None;
                self.followed = Some((record, written_after));
            }
        }
        self.fresh
    }
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
    use super::*;

    #[test]
    fn the_request_reads_the_engines_record() {
        let key = crate::replicate::FRESHNESS_KEY;
        assert_eq!(GET_RECORD, format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes());
    }

    const fn beat(run: u64, seq: u64) -> Option<Option<FreshnessRecord>> {
        Some(Some(FreshnessRecord { run, seq }))
    }

    /// Reads sent 10 ms apart from `start`, each seeing what `seen` says; what each published.
    fn follow(start: Instant, seen: &[Option<Option<FreshnessRecord>>]) -> Vec<Option<Fresh>> {
        let mut chain = Chain::default();
        let at = |i: usize| start + Duration::from_millis(10 * i as u64);
        seen.iter().enumerate().map(|(i, seen)| chain.observe(at(i), *seen)).collect()
    }

    #[test]
    fn the_covered_instant_is_the_read_before_the_beat_before_the_one_just_seen() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let published =
            follow(t, &[beat(1, 5), beat(1, 5), beat(1, 6), beat(1, 6), beat(1, 7), beat(1, 7), beat(1, 8)]);
        // 5 and 6 alone prove nothing: 6's mark may predate every read.
        assert_eq!(published[..4], [None; 4]);
        // 7 was marked after 6 was written, and 6 after the read at 10 ms (which saw 5).
        assert_eq!(published[4], Some(Fresh { covered: ms(10), confirmed: ms(40) }));
        assert_eq!(published[5], Some(Fresh { covered: ms(10), confirmed: ms(50) }), "seen again: confirmed");
        assert_eq!(published[6], Some(Fresh { covered: ms(30), confirmed: ms(60) }), "and only forward");
    }

    #[test]
    fn anything_but_the_beat_followed_or_the_next_one_ends_the_trust() {
        let t = Instant::now();
        let trusted = [beat(1, 1), beat(1, 2), beat(1, 3)];
        for (what, next) in [
            ("a failed read", None),
            ("no record", Some(None)),
            ("a number skipped: a beat after a failed one", beat(1, 5)),
            ("an earlier number: a beat written late", beat(1, 1)),
            ("another run", beat(2, 4)),
        ] {
            let mut seen = trusted.to_vec();
            seen.push(next);
            let published = follow(t, &seen);
            assert!(published[2].is_some(), "{what}: trusted before");
            assert_eq!(published[3], None, "{what}");
            // A new chain starts: its first beat proves nothing yet.
            seen.push(beat(2, 8));
            assert_eq!(follow(t, &seen)[4], None, "{what}: a new beat alone");
        }
    }

    #[test]
    fn a_beat_first_seen_right_after_a_failed_read_covers_nothing_before_it() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let published = follow(t, &[beat(1, 1), None, beat(1, 2), beat(1, 3), beat(1, 4)]);
        assert_eq!(published[3], None, "when 2 was written is unknown: the read before it failed");
        assert_eq!(published[4], Some(Fresh { covered: ms(20), confirmed: ms(40) }));
    }

    #[tokio::test(start_paused = true)]
    async fn trust_lapses_past_the_lag_guard_or_without_a_recent_confirmation() {
        let now = Instant::now();
        let fresh = Fresh { covered: now, confirmed: now };
        let max_lag = TRUSTED_FOR * 3;
        assert_eq!(fresh.covered_within(max_lag), Some(now));
        tokio::time::advance(TRUSTED_FOR + Duration::from_millis(1)).await;
        assert_eq!(fresh.covered_within(max_lag), None, "not confirmed lately");
        let confirmed = Fresh { confirmed: Instant::now(), ..fresh };
        assert_eq!(confirmed.covered_within(max_lag), Some(now));
        tokio::time::advance(max_lag).await;
        let confirmed = Fresh { confirmed: Instant::now(), ..fresh };
        assert_eq!(confirmed.covered_within(max_lag), None, "past the lag guard");
    }
}
