//! The expiry hold: how the target, a primary that expires keys by its own clock, ends with the
//! source's keys and expiries exactly, where a replica would simply wait for its primary.
//!
//! A replica never expires a key on its own. It keeps every key until its primary's stream says
//! otherwise, and a primary propagates a DEL for every key it expires (by its expiry cycle, or
//! when a command touches the key, before that command). Eden's target is a primary: it deletes a
//! key as soon as the key's absolute expiry passes by the target's clock. Applied late, the
//! source's history then loses keys the source still has: a snapshot key whose expiry passed
//! while the snapshot travelled never appears, and the renewal that follows in the stream
//! (`PEXPIREAT`) finds nothing to renew; a stream applied seconds behind (the backlog after the
//! snapshot, a reconnect) applies renewals whose time is already up, which delete the key.
//! Sessions and rate limiters, renewed every few ms, vanish from the target for good.
//!
//! So from the snapshot's first key until the stream has caught up, every absolute expiry Eden
//! writes is [`SHIFT_MS`] later than the source's: the snapshot's RESTOREs and SETs, and the
//! stream's PEXPIREAT, EXPIREAT, `SET … PXAT|EXAT` and `RESTORE … ABSTTL` ([`rewrite`]). Nothing
//! the copy holds expires on the target by itself, as on a replica: only the source's decisions
//! (a DEL for a key it expired or deleted, a renewal, a PERSIST) reach it. The hold is recorded
//! with the position, in the MULTI of every batch, so a restart holds again where it left off.
//!
//! The hold ends once the target has applied what the source had written at the last
//! once-a-second check (or the one before, on a busy source) and nothing received is waiting.
//! From then on the target takes each expiry [`EXPIRY_GRACE_MS`] after the source's, and
//! [`Settle`] SCANs every database of the target with expiring keys and gives each key whose
//! expiry is at or past [`SHIFT_MS`] its own back, the grace added (PEXPIRETIME, then PEXPIREAT;
//! PTTL and PEXPIRE before Redis 7.0; a time already up deletes the key); a copy that wrote no
//! expiry shifted (no key of the snapshot or the catch-up had one) has nothing to settle and
//! skips the pass. While it runs, replication reports the backfill as not done. Why the result
//! is exact:
//! - A key still held has had no expiry written by the stream since it was held, so the
//!   source's expiry is the held one less the shift (commands that keep a TTL, such as
//!   `SET … KEEPTTL` or LPUSH, keep it on both sides). If that time is up, the source holds the
//!   key logically expired (its DEL may still be on its way), and deleting it matches.
//! - The settle's reads and writes go over the target connection between stream batches, and
//!   nothing else writes to the target before cutover (DESIGN.md §4): nothing changes a key
//!   between the read of its expiry and the write that gives it back.
//! - A key the stream moves while the pass runs (RENAME, RENAMENX, COPY, MOVE) may land where
//!   the SCAN has already been: its destination is settled on its own; a SWAPDB starts the pass
//!   over.
//! - PEXPIREAT's NX, XX, GT and LT are dropped: the source propagates only an expiry it has
//!   set, and judged against a target key held, or taken a grace later, they could refuse it.
//!
//! Why a grace after the hold. With the stream a few ms behind, a renewal the source applied
//! just before the key's time reaches the target just after it: the target has deleted the key,
//! and the renewal finds nothing. Taking every expiry [`EXPIRY_GRACE_MS`] late, the target
//! deletes a key by itself only when the source's stream is that far behind; a key the source
//! expires is deleted by the source's DEL as soon as it arrives, or by the target's own clock
//! at most the grace later. The grace is within the verifier's 1 s TTL tolerance.
//!
//! Limits: a renewal more than [`EXPIRY_GRACE_MS`] late (a stalled target, a starved process)
//! after the hold can still find its key gone; only a hold kept until cutover, settled while
//! writes are paused, would rule that out. A source expiry at or past 2^52 ms (the year 144,000
//! or so) reads as held and is moved back by the shift. Sources older than Redis 7.0 propagate
//! EXPIRE, PEXPIRE and SETEX with relative times: applied late, such a key outlives the
//! source's by the lag of the time (it is never lost).

use std::collections::VecDeque;
use std::time::Instant;

use redis_protocol::resp2::types::BytesFrame;

use super::link::{Decimal, encode, encode_into, text};
use super::target::Target;
use crate::replicate::ReplicateError;
use crate::replicate::copy::{now_ms, redis_version};

/// How much later than the source's every held expiry is: about 142,700 years.
pub(crate) const SHIFT_MS: u64 = 1 << 52;

/// How much later than the source's the target takes every expiry outside the hold: a renewal
/// the stream brings up to this late still finds its key. Within the verifier's TTL tolerance.
pub const EXPIRY_GRACE_MS: u64 = 500;

/// Keys per settle step (SCAN COUNT): one step runs between two stream batches, so a step is
/// kept short enough not to hold the stream up.
const SETTLE_COUNT: &[u8] = b"100";

/// `at_ms` as the target holds it during the hold. An expiry already at or past the shift
/// cannot pass while the copy runs and is left as it is.
pub(crate) fn held(at_ms: u64) -> u64 {
    if at_ms < SHIFT_MS { at_ms + SHIFT_MS } else { at_ms }
}

/// Where the hold stands for the stream follower.
pub(crate) enum Hold {
    /// The target holds the source's expiries as they are.
    Off,
    /// Expiries are written shifted. `goal` is the source's offset as of the last check: the
    /// hold ends at a check that finds it applied and nothing received waiting. `shifted`: an
    /// expiry was written shifted (or may have been, before a restart), so a settle pass must
    /// follow; without one there is nothing to settle.
    Holding { since: Instant, goal: Option<u64>, shifted: bool },
    /// Expiries pass as they come while the settle pass gives held keys their own back.
    Settling { since: Instant, settle: Settle },
}

impl Hold {
    /// The hold a restart finds recorded (`held`), or none: what was shifted before is unknown.
    pub(crate) fn new(held: bool, since: Instant) -> Self {
        if held { Self::after_load(since, true) } else { Hold::Off }
    }

    /// The hold after a snapshot that began `since`, which wrote some expiries shifted or none.
    pub(crate) fn after_load(since: Instant, shifted: bool) -> Self {
        Hold::Holding { since, goal: None, shifted }
    }

    /// Whether the target may hold shifted expiries (what the position record says).
    pub(crate) fn recorded(&self) -> bool {
        !matches!(self, Hold::Off)
    }

    /// Since when the target has not been a faithful copy because of the hold.
    pub(crate) fn since(&self) -> Option<Instant> {
        match self {
            Hold::Off => None,
            Hold::Holding { since, .. } | Hold::Settling { since, .. } => Some(*since),
        }
    }

    /// At a periodic check, with the source's offset just read, the offset applied and whether
    /// stream bytes received are still waiting: ends the shifting once the target has caught up
    /// with this check's offset (a quiet source) or the previous one's (a busy one).
    pub(crate) fn check(&mut self, master: u64, applied: u64, waiting: bool) {
        if let Hold::Holding { since, goal, shifted } = self {
            if goal.map_or(master, |goal| goal.min(master)) <= applied && !waiting {
                let settle = if *shifted { Settle::default() } else { Settle::finished() };
                *self = Hold::Settling { since: *since, settle };
            } else {
                *goal = Some(master);
            }
        }
    }

    /// A stream command whose absolute expiry the target takes later than the source (see the
    /// module docs), or `None` to forward it as it is. `name` is upper case; `args` follow it.
    pub(crate) fn rewrite(&mut self, name: &[u8], args: &[&[u8]]) -> Option<Vec<u8>> {
        let rewritten = self.rewritten(name, args);
        if let (Some(_), Hold::Holding { shifted, .. }) = (&rewritten, self) {
            *shifted = true;
        }
        rewritten
    }

    fn rewritten(&self, name: &[u8], args: &[&[u8]]) -> Option<Vec<u8>> {
        let later: fn(u64) -> u64 = match self {
            Hold::Holding { .. } => held,
            Hold::Settling { .. } | Hold::Off => |at| at.saturating_add(EXPIRY_GRACE_MS),
        };
        let ms = |time: &[u8], seconds: bool| -> Option<u64> {
            let time: u64 = std::str::from_utf8(time).ok()?.parse().ok()?;
            if seconds { time.checked_mul(1000) } else { Some(time) }
        };
        // The command with some arguments (counted after the name) replaced.
        let replaced = |name: &[u8], replacements: &[(usize, &[u8])]| {
            let mut out: Vec<&[u8]> = [name].into_iter().chain(args.iter().copied()).collect();
            for &(at, value) in replacements {
                out[at + 1] = value;
            }
            encode(&out)
        };
        match name {
            b"PEXPIREAT" | b"EXPIREAT" => {
                let [key, time, ..] = args else { return None };
                let at = Decimal::new(later(ms(time, name == b"EXPIREAT")?));
                Some(encode(&[b"PEXPIREAT", key, at.as_bytes()]))
            }
            // The options follow the key and the value (which may itself read "PXAT").
            b"SET" => {
                let option = 2 + args.get(2..)?.iter().position(|a| is(a, "PXAT") || is(a, "EXAT"))?;
                let at = Decimal::new(later(ms(args.get(option + 1)?, is(args[option], "EXAT"))?));
                Some(replaced(b"SET", &[(option, b"PXAT"), (option + 1, at.as_bytes())]))
            }
            b"RESTORE" if args.get(3..)?.iter().any(|a| is(a, "ABSTTL")) => {
                let at = Decimal::new(later(ms(args[1], false).filter(|&at| at > 0)?));
                Some(replaced(b"RESTORE", &[(1, at.as_bytes())]))
            }
            _ => None,
        }
    }

    /// Notes a stream command in database `db` that may move a held key where the settle pass
    /// has already been.
    pub(crate) fn note(&mut self, name: &[u8], args: &[&[u8]], db: u64) {
        let Hold::Settling { settle, .. } = self else { return };
        let destination = match (name, args) {
            (b"RENAME" | b"RENAMENX", [_, to, ..]) => (db, to.to_vec()),
            (b"MOVE", [key, to, ..]) => match std::str::from_utf8(to).ok().and_then(|to| to.parse().ok()) {
                Some(to) => (to, key.to_vec()),
                None => return,
            },
            (b"COPY", [_, to, options @ ..]) => {
                let into = options.iter().position(|o| is(o, "DB")).and_then(|at| options.get(at + 1));
                let into = into.and_then(|db| std::str::from_utf8(db).ok()?.parse().ok());
                (into.unwrap_or(db), to.to_vec())
            }
            (b"SWAPDB", _) => {
                settle.again = true;
                return;
            }
            _ => return,
        };
        settle.moved.push(destination);
    }
}

fn is(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

/// The settle pass: every database of the target with expiring keys, SCANned a step at a time.
pub(crate) struct Settle {
    /// Databases still to scan, the current one first.
    dbs: VecDeque<u64>,
    cursor: u64,
    /// Keys the stream moved while the pass ran, by database.
    moved: Vec<(u64, Vec<u8>)>,
    /// The pass (re)starts: read which databases have keys.
    again: bool,
    /// The target reads absolute expiries (PEXPIRETIME, Redis 7.0), so each is given back to
    /// the millisecond; older ones get the time left (PTTL, PEXPIRE), a round trip off.
    absolute: bool,
}

impl Default for Settle {
    fn default() -> Self {
        Settle { dbs: VecDeque::new(), cursor: 0, moved: Vec::new(), again: true, absolute: false }
    }
}

impl Settle {
    /// A pass with nothing to settle: no expiry was written shifted.
    fn finished() -> Self {
        Settle { again: false, ..Settle::default() }
    }

    /// Settles one SCAN step's keys, or the moved keys once the SCAN is through; `true` when
    /// every key is settled.
    pub(crate) async fn step(&mut self, target: &mut Target) -> Result<bool, ReplicateError> {
        if std::mem::take(&mut self.again) {
            let server = target.link.call(&[b"INFO", b"server"]).await?;
            self.absolute = redis_version(text(&server).unwrap_or_default()) >= (7, 0);
            let keyspace = target.link.call(&[b"INFO", b"keyspace"]).await?;
            self.dbs = databases(text(&keyspace).unwrap_or_default());
            self.cursor = 0;
        }
        if let Some(&db) = self.dbs.front() {
            let mut request = Vec::new();
            let selects = target.select(&mut request, db);
            let cursor = Decimal::new(self.cursor);
            encode_into(&mut request, &[b"SCAN", cursor.as_bytes(), b"COUNT", SETTLE_COUNT]);
            target.exchange(&request, selects, "SELECT").await?;
            let (cursor, keys) = scan_reply(target.expect_ok("SCAN").await?)
                .ok_or_else(|| target.link.error("SCAN answered something other than a cursor and keys"))?;
            self.cursor = cursor;
            if cursor == 0 {
                self.dbs.pop_front();
            }
            self.settle(target, db, &keys).await?;
            return Ok(false);
        }
        let Some((db, key)) = self.moved.pop() else { return Ok(true) };
        self.settle(target, db, &[key]).await?;
        Ok(false)
    }

    /// Gives each of `keys` (in database `db`) that the target holds with a shifted expiry the
    /// source's expiry back; one whose time is up is deleted (an expiry in the past).
    async fn settle(&self, target: &mut Target, db: u64, keys: &[Vec<u8>]) -> Result<(), ReplicateError> {
        if keys.is_empty() {
            return Ok(());
        }
        let (read, write, held_from): (&[u8], &[u8], i64) = if self.absolute {
            (b"PEXPIRETIME", b"PEXPIREAT", SHIFT_MS as i64)
        } else {
            (b"PTTL", b"PEXPIRE", SHIFT_MS.saturating_sub(now_ms()) as i64)
        };
        let mut request = Vec::new();
        let selects = target.select(&mut request, db);
        for key in keys {
            encode_into(&mut request, &[read, key]);
        }
        target.exchange(&request, selects, "SELECT").await?;
        request.clear();
        let mut fixes = 0;
        for key in keys {
            match target.expect_ok("PEXPIRETIME or PTTL").await? {
                BytesFrame::Integer(time) if time >= held_from => {
                    let own = time - SHIFT_MS as i64 + EXPIRY_GRACE_MS as i64;
                    encode_into(&mut request, &[write, key, own.to_string().as_bytes()]);
                    fixes += 1;
                }
                _ => {}
            }
        }
        target.exchange(&request, fixes, "PEXPIREAT or PEXPIRE").await
    }
}

/// The databases `INFO keyspace` lists with keys that expire (`db3:keys=9,expires=2,…`): a
/// held key has an expiry, and one moved into another database later is settled on its own.
fn databases(info: &str) -> VecDeque<u64> {
    info.lines()
        .filter_map(|line| {
            let (db, fields) = line.strip_prefix("db")?.split_once(':')?;
            let expires = fields.split(',').find_map(|field| field.strip_prefix("expires="))?;
            (expires != "0").then(|| db.parse().ok())?
        })
        .collect()
}

/// A SCAN reply: the next cursor and the keys.
fn scan_reply(reply: BytesFrame) -> Option<(u64, Vec<Vec<u8>>)> {
    let BytesFrame::Array(mut parts) = reply else { return None };
    let BytesFrame::Array(keys) = parts.pop()? else { return None };
    let cursor = text(parts.first()?)?.parse().ok()?;
    let keys =
        keys.into_iter().map(|key| if let BytesFrame::BulkString(key) = key { Some(key.to_vec()) } else { None });
    Some((cursor, keys.collect::<Option<_>>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(hold: &mut Hold, command: &[&str]) -> Option<String> {
        let args: Vec<&[u8]> = command[1..].iter().map(|a| a.as_bytes()).collect();
        let out = hold.rewrite(command[0].as_bytes(), &args)?;
        let out = String::from_utf8(out).unwrap();
        Some(out.split("\r\n").filter(|p| !p.is_empty() && !p.starts_with(['*', '$'])).collect::<Vec<_>>().join(" "))
    }

    #[test]
    fn absolute_expiries_are_shifted_while_held_then_a_grace_later_without_conditions() {
        let holding = &mut Hold::after_load(Instant::now(), false);
        let at = |ms: u64| (ms + SHIFT_MS).to_string();
        assert_eq!(rewritten(holding, &["PEXPIREAT", "k", "1000", "GT"]), Some(format!("PEXPIREAT k {}", at(1000))));
        assert_eq!(rewritten(holding, &["EXPIREAT", "k", "2"]), Some(format!("PEXPIREAT k {}", at(2000))));
        assert_eq!(
            rewritten(holding, &["SET", "k", "PXAT", "NX", "PXAT", "5"]),
            Some(format!("SET k PXAT NX PXAT {}", at(5))),
            "a value reading PXAT is a value"
        );
        assert_eq!(rewritten(holding, &["SET", "k", "v", "exat", "3"]), Some(format!("SET k v PXAT {}", at(3000))));
        assert_eq!(rewritten(holding, &["SET", "k", "v"]), None);
        assert_eq!(
            rewritten(holding, &["RESTORE", "k", "7", "payload", "ABSTTL", "REPLACE"]),
            Some(format!("RESTORE k {} payload ABSTTL REPLACE", at(7)))
        );
        assert_eq!(rewritten(holding, &["RESTORE", "k", "7", "payload"]), None, "a relative TTL is never early");
        assert_eq!(rewritten(holding, &["PEXPIREAT", "k", "-5"]), None, "forwarded: it deletes on both sides");
        assert_eq!(held(SHIFT_MS + 1), SHIFT_MS + 1);
        assert!(matches!(holding, Hold::Holding { shifted: true, .. }), "a settle pass must follow");

        let settling = Hold::Settling { since: Instant::now(), settle: Settle::default() };
        let late = |ms: u64| (ms + EXPIRY_GRACE_MS).to_string();
        for mut hold in [settling, Hold::Off] {
            assert_eq!(
                rewritten(&mut hold, &["PEXPIREAT", "k", "1000", "LT"]),
                Some(format!("PEXPIREAT k {}", late(1000)))
            );
            assert_eq!(
                rewritten(&mut hold, &["SET", "k", "v", "PXAT", "3"]),
                Some(format!("SET k v PXAT {}", late(3)))
            );
            assert_eq!(rewritten(&mut hold, &["SET", "k", "v", "NX"]), None);
        }
    }

    #[test]
    fn the_hold_ends_at_a_check_that_finds_the_previous_offset_applied() {
        let mut hold = Hold::new(true, Instant::now());
        hold.check(100, 50, false);
        assert!(matches!(hold, Hold::Holding { goal: Some(100), .. }));
        hold.check(180, 120, true);
        assert!(matches!(hold, Hold::Holding { goal: Some(180), .. }), "bytes received still wait");
        hold.check(200, 180, false);
        assert!(matches!(hold, Hold::Settling { .. }));
        assert!(hold.recorded());

        let mut quiet = Hold::new(true, Instant::now());
        quiet.check(100, 100, false);
        assert!(matches!(quiet, Hold::Settling { .. }), "a source with nothing new ends it at once");
        assert!(matches!(quiet, Hold::Settling { settle: Settle { again: true, .. }, .. }), "a restart settles");
        let mut nothing = Hold::after_load(Instant::now(), false);
        nothing.check(100, 100, false);
        assert!(matches!(nothing, Hold::Settling { settle: Settle { again: false, .. }, .. }), "nothing to scan");
    }

    #[test]
    fn keys_moved_during_the_pass_are_settled_where_they_land() {
        let mut hold = Hold::Settling { since: Instant::now(), settle: Settle::default() };
        let args = |a: &[&'static str]| a.iter().map(|a| a.as_bytes()).collect::<Vec<_>>();
        hold.note(b"RENAME", &args(&["a", "b"]), 2);
        hold.note(b"MOVE", &args(&["c", "5"]), 2);
        hold.note(b"COPY", &args(&["d", "e", "db", "7", "REPLACE"]), 2);
        hold.note(b"COPY", &args(&["d", "f"]), 2);
        hold.note(b"SET", &args(&["g", "v"]), 2);
        let Hold::Settling { settle, .. } = &hold else { unreachable!() };
        let moved: Vec<(u64, &[u8])> = settle.moved.iter().map(|(db, k)| (*db, k.as_slice())).collect();
        assert_eq!(moved, [(2, b"b".as_slice()), (5, b"c"), (7, b"e"), (2, b"f")]);
        let keyspace = "# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\ndb12:keys=4,expires=1,avg_ttl=9\r\n";
        assert_eq!(databases(keyspace), [12]);
    }
}
