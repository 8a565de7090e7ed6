//! Strategy → upstream, command by command (DESIGN §4, §6).
//!
//! Everything here is a pure function of one configuration snapshot, the command's kind and
//! key, and a die roll: no I/O, no allocation, no locks. A session takes one [`Strategy`] per
//! batch of requests, so a configuration change never tears a pipeline or a transaction in
//! half, and asks it where each request goes.
//!
//! The rules, in one place:
//! - Writes go to their **owner**: the side `write_policy` names in `dual_write`, or, in
//!   `cutover`, the side the key's hash bucket falls on (`write_percentage` of the buckets are
//!   the target's), so one key always has one owner. They are **mirrored** (asynchronously) to
//!   the other side only when `mirror_writes` says so; in `cutover` only target-owned keys are
//!   mirrored, back to the source, because source-owned keys reach the target through
//!   replication (DESIGN §9).
//! - Reads of keys the source owns go to the target with probability `read_percentage`, per
//!   command or by key hash (`read_routing`); keys the target owns are read there, since the
//!   source gets their writes only through the asynchronous mirror. A shadowed read (`shadow_read_percentage`) is answered by the key's
//!   owner and also sent to the other side for comparison.
//! - Blocking commands go to the owner and are never mirrored (a second BLPOP would pop a
//!   second item). Admin commands (CONFIG, INFO, OBJECT, CLIENT…) go to the owner too, of
//!   their key when they name one, else of keyless writes: they inspect or tune the server
//!   that serves the client's data. Connection state and pub/sub stay on the source.
//! - While writes are held ([`HoldState::Holding`]: the cutover pause, or a strategy this
//!   sidecar cannot confirm as current) a write is not routed at all; once held too long
//!   ([`HoldState::Refusing`]) it is answered with an error, never sent to a side that may no
//!   longer own it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::cluster::{SLOTS, hash_slot};
use crate::command::CommandKind;
use crate::config::{EdenConfig, ReadRouting, WriteMode, WritePolicy};
use crate::hold::{HoldReason, HoldState};
use crate::session::ClientWrites;

/// One of the two servers a migration moves between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Source = 0,
    Target = 1,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Source, Side::Target];

    pub fn other(self) -> Side {
        match self {
            Side::Source => Side::Target,
            Side::Target => Side::Source,
        }
    }

    /// The `route` label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

/// Where one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Send it to `answer`, whose reply the client gets; also send it to `mirror` (replies
    /// discarded, failures counted) and, for a shadowed read, to `answer.other()` to compare.
    Send { answer: Side, mirror: Option<Side>, shadow: bool },
    /// Writes are held: stop here until the hold ends, then ask again.
    Hold,
    /// Writes are refused: answer with [`HoldState::refusal`].
    Refuse(HoldReason),
}

impl Route {
    const SOURCE: Route = Route::Send { answer: Side::Source, mirror: None, shadow: false };

    fn to(answer: Side) -> Route {
        Route::Send { answer, mirror: None, shadow: false }
    }
}

/// Whether reads of keys the source owns may go to the target (DESIGN §9, "Freshness").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TargetReads {
    /// No gate: the payload sets no lag guard (nothing replicates; the sidecars' own mirrors
    /// feed the target).
    #[default]
    Ungated,
    /// The target holds every source write answered before this instant, and that instant is
    /// within the lag guard; `None` when the target is not known to be within it.
    CoveredBefore(Option<Instant>),
}

impl TargetReads {
    /// Whether the target holds everything a client with `writes` has written.
    fn holds(self, writes: ClientWrites) -> bool {
        match (self, writes) {
            (TargetReads::Ungated, _) => true,
            (TargetReads::CoveredBefore(None), _) | (_, ClientWrites::Waiting) => false,
            (TargetReads::CoveredBefore(Some(_)), ClientWrites::None) => true,
            (TargetReads::CoveredBefore(Some(covered)), ClientWrites::AnsweredAt(answered)) => answered < covered,
        }
    }
}

/// One consistent view of the strategy: the configuration in force, the hold state, and how far
/// the target can be read.
#[derive(Debug, Clone, Default)]
pub struct Strategy {
    /// `None` before a first payload, or when the payload has no target: everything to the source.
    config: Option<Arc<EdenConfig>>,
    hold: HoldState,
    target_reads: TargetReads,
    /// What [`Self::needs_keys`] answers, worked out once per snapshot rather than per request.
    needs_keys: bool,
}

impl Strategy {
    pub fn new(config: Option<Arc<EdenConfig>>, hold: HoldState) -> Self {
        let config = config.filter(|config| config.target.is_some());
        let needs_keys = config.as_ref().is_some_and(|config| {
            config.write_mode == WriteMode::Cutover
                || config.read_routing == ReadRouting::KeyHash
                || config.shadow_read_percentage > 0
        });
        Strategy { config, hold, target_reads: TargetReads::Ungated, needs_keys }
    }

    /// How long a read the target serves for the source may take before the source's answer
    /// is used (`None`: no deadline), for a read of `key`; only keys the source owns have a
    /// source to fall back on.
    pub fn target_read_deadline(&self, key: Option<&[u8]>) -> Option<std::time::Duration> {
        let config = self.config.as_ref()?;
        let deadline = config.target_read_deadline_ms?;
        (owner(config, key) == Side::Source).then(|| std::time::Duration::from_millis(deadline))
    }

    pub fn with_target_reads(mut self, target_reads: TargetReads) -> Self {
        self.target_reads = target_reads;
        self
    }

    /// Whether a read of `key` that [`Self::route`] sent to the target may be served there for
    /// a client whose writes are `writes`: always when the target owns the key; else only when
    /// something feeds the target the source's writes, and the target holds every write the
    /// client saw answered (read-your-writes) and is within the lag guard.
    pub fn target_may_serve(&self, key: Option<&[u8]>, writes: ClientWrites) -> bool {
        let Some(config) = &self.config else { return false };
        if owner(config, key) == Side::Target {
            return true;
        }
        let fed = match self.target_reads {
            // Replication feeds the target; its freshness record says how far.
            TargetReads::CoveredBefore(_) => true,
            // No replication: the sidecars' own mirrors are all that feed it, and in `cutover`
            // they never carry source-owned keys (replication would). In a split (which runs
            // only without replication, DESIGN §9) the target keeps the values those keys had
            // when writes split, so their reads stay on the source.
            TargetReads::Ungated => config.write_mode == WriteMode::DualWrite,
        };
        fed && self.target_reads.holds(writes)
    }

    /// Where a request of `kind` whose first key is `key` goes, outside a transaction.
    pub fn route(&self, kind: CommandKind, key: Option<&[u8]>, dice: &mut Dice) -> Route {
        if writes(kind) {
            match self.hold {
                HoldState::Holding(_) => return Route::Hold,
                HoldState::Refusing(reason) => return Route::Refuse(reason),
                HoldState::Flowing => {}
            }
        }
        let Some(config) = &self.config else { return Route::SOURCE };
        match kind {
            CommandKind::Write | CommandKind::Other => {
                let owner = owner(config, key);
                Route::Send { answer: owner, mirror: mirror(config, owner), shadow: false }
            }
            CommandKind::Blocking => Route::to(owner(config, key)),
            CommandKind::Admin => Route::to(self.owner(key)),
            CommandKind::Read => {
                // A share of 0 needs no roll (the die is a few instructions, per read).
                if config.shadow_read_percentage > 0 && dice.percent() < config.shadow_read_percentage {
                    return Route::Send { answer: owner(config, key), mirror: None, shadow: true };
                }
                // A key the target owns is read there, whatever the read share: the source gets
                // its writes only through the asynchronous mirror, so a read there could miss
                // the client's own acknowledged write, or go back in time after one served by
                // the target.
                if owner(config, key) == Side::Target {
                    return Route::to(Side::Target);
                }
                if config.read_percentage == 0 {
                    return Route::SOURCE;
                }
                let roll = match (config.read_routing, key) {
                    (ReadRouting::KeyHash, Some(key)) => key_bucket(key),
                    _ => dice.percent(),
                };
                Route::to(if roll < config.read_percentage { Side::Target } else { Side::Source })
            }
            CommandKind::Transaction | CommandKind::PubSub | CommandKind::Connection => Route::SOURCE,
        }
    }

    /// The side a transaction (MULTI…EXEC, or what follows a WATCH) runs on, decided by its
    /// first key, and where its requests are mirrored. Transactions are never held part-way:
    /// once started they finish on their side.
    pub fn transaction(&self, key: Option<&[u8]>) -> (Side, Option<Side>) {
        match &self.config {
            Some(config) => {
                let owner = owner(config, key);
                (owner, mirror(config, owner))
            }
            None => (Side::Source, None),
        }
    }

    /// The side that owns writes to `key` (keyless: writes that name no key) right now.
    pub fn owner(&self, key: Option<&[u8]>) -> Side {
        self.transaction(key).0
    }

    /// Whether any answer of this strategy depends on a request's key: a split by key
    /// (`cutover`), reads routed by key hash, and shadow reads (a mismatch is logged by its key).
    /// Otherwise every key has the same owner and read share, and a session need not look for
    /// keys at all, as the plain proxy does not (about a fifth of a pipelined request's cost).
    pub fn needs_keys(&self) -> bool {
        self.needs_keys
    }

    /// Whether writes are held right now.
    pub fn holding(&self) -> bool {
        matches!(self.hold, HoldState::Holding(_))
    }

    /// Why writes are refused right now, if they are.
    pub fn refusing(&self) -> Option<HoldReason> {
        match self.hold {
            HoldState::Refusing(reason) => Some(reason),
            _ => None,
        }
    }

    /// Whether the strategy names a target: there is another side.
    pub fn has_target(&self) -> bool {
        self.config.is_some()
    }

    pub fn generation(&self) -> Option<u64> {
        self.config.as_ref().map(|config| config.generation)
    }
}

/// Kinds that change data, or may (a name the table does not know is treated as a write: the
/// safe side). These go to the owner and are held during a pause.
pub fn writes(kind: CommandKind) -> bool {
    matches!(kind, CommandKind::Write | CommandKind::Other | CommandKind::Blocking)
}

/// The side that owns writes to `key` (keyless writes: the side that owns every key, else the source).
fn owner(config: &EdenConfig, key: Option<&[u8]>) -> Side {
    match config.write_mode {
        WriteMode::DualWrite => match config.write_policy {
            WritePolicy::OldAuthoritative => Side::Source,
            WritePolicy::NewAuthoritative => Side::Target,
        },
        WriteMode::Cutover => {
            let bucket = key.map_or(if config.write_percentage == 100 { 0 } else { 100 }, key_bucket);
            if bucket < config.write_percentage { Side::Target } else { Side::Source }
        }
    }
}

/// Where writes owned by `owner` are mirrored.
fn mirror(config: &EdenConfig, owner: Side) -> Option<Side> {
    match (config.mirror_writes, config.write_mode, owner) {
        (false, _, _) => None,
        (true, WriteMode::DualWrite, owner) => Some(owner.other()),
        (true, WriteMode::Cutover, Side::Target) => Some(Side::Source),
        (true, WriteMode::Cutover, Side::Source) => None,
    }
}

/// A key's bucket, 0–99: its Redis Cluster hash slot (hash tags included, so `{user:1}:cart`
/// and `{user:1}:orders` share an owner) scaled to a percentage. A key is the target's when
/// its bucket is below the percentage, so raising a percentage only ever moves keys one way.
/// This is the one definition of key ownership; anything that splits keys by owner uses it.
pub fn key_bucket(key: &[u8]) -> u32 {
    u32::from(hash_slot(key)) * 100 / u32::from(SLOTS)
}

/// A session's random numbers for percentage splits: xorshift64*, a few instructions per roll.
/// Not for secrets; it only has to spread reads evenly.
#[derive(Debug)]
pub struct Dice(u64);

impl Dice {
    /// Seeded from the clock and a process-wide counter, so sessions do not roll in step.
    pub fn new() -> Dice {
        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seed = (clock as u64) ^ SESSIONS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Dice(seed | 1)
    }

    /// Uniform in 0..100.
    pub fn percent(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32 % 100
    }
}

impl Default for Dice {
    fn default() -> Self {
        Dice::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{UpstreamConfig, WritesState};

    fn config(edit: impl FnOnce(&mut EdenConfig)) -> Strategy {
        let mut config = EdenConfig {
            generation: 1,
            migration: "shop/cache".into(),
            source: UpstreamConfig { uri: "redis://source:6379".into(), credentials_file: None },
            target: Some(UpstreamConfig { uri: "redis://target:6379".into(), credentials_file: None }),
            read_percentage: 0,
            read_routing: ReadRouting::Random,
            write_mode: WriteMode::DualWrite,
            write_policy: WritePolicy::OldAuthoritative,
            write_percentage: 100,
            mirror_writes: false,
            shadow_read_percentage: 0,
            writes: WritesState::Flowing,
            max_lag_ms: None,
            target_read_deadline_ms: None,
        };
        edit(&mut config);
        Strategy::new(Some(Arc::new(config)), HoldState::Flowing)
    }

    fn send(answer: Side, mirror: Option<Side>) -> Route {
        Route::Send { answer, mirror, shadow: false }
    }

    #[test]
    fn buckets_are_percentages() {
        assert!((0..10_000).all(|i| key_bucket(format!("k{i}").as_bytes()) < 100));
    }

    #[test]
    fn writes_follow_the_write_mode() {
        use CommandKind::*;
        let dice = &mut Dice::new();
        let old = config(|c| c.mirror_writes = true);
        assert_eq!(old.route(Write, Some(b"k"), dice), send(Side::Source, Some(Side::Target)));
        assert_eq!(old.route(Blocking, Some(b"k"), dice), send(Side::Source, None), "blocking: never mirrored");
        let quiet = config(|_| {});
        assert_eq!(quiet.route(Write, Some(b"k"), dice), send(Side::Source, None), "replication feeds the target");
        let new = config(|c| (c.write_policy, c.mirror_writes) = (WritePolicy::NewAuthoritative, true));
        assert_eq!(new.route(Other, None, dice), send(Side::Target, Some(Side::Source)));

        let split = config(|c| (c.write_mode, c.write_percentage, c.mirror_writes) = (WriteMode::Cutover, 30, true));
        for i in 0..1000 {
            let key = format!("key:{i}");
            let expected = if key_bucket(key.as_bytes()) < 30 {
                send(Side::Target, Some(Side::Source))
            } else {
                send(Side::Source, None)
            };
            assert_eq!(split.route(Write, Some(key.as_bytes()), dice), expected, "{key}");
        }
        assert_eq!(split.route(Write, None, dice), send(Side::Source, None), "keyless writes stay on the source");
        let all = config(|c| (c.write_mode, c.write_percentage) = (WriteMode::Cutover, 100));
        assert_eq!(all.route(Write, None, dice), send(Side::Target, None));
    }

    #[test]
    fn admin_commands_go_to_the_owner_of_their_key_or_of_keyless_writes() {
        let dice = &mut Dice::new();
        let canary = config(|c| c.read_percentage = 100);
        assert_eq!(canary.route(CommandKind::Admin, Some(b"k"), dice), send(Side::Source, None), "not a read");
        let cut_over = config(|c| (c.write_policy, c.mirror_writes) = (WritePolicy::NewAuthoritative, true));
        assert_eq!(cut_over.route(CommandKind::Admin, None, dice), send(Side::Target, None), "never mirrored");
        let split = config(|c| (c.write_mode, c.write_percentage) = (WriteMode::Cutover, 50));
        assert_eq!(split.route(CommandKind::Admin, None, dice), send(Side::Source, None));
        for i in 0..100 {
            let key = format!("key:{i}");
            let owner = if key_bucket(key.as_bytes()) < 50 { Side::Target } else { Side::Source };
            assert_eq!(split.route(CommandKind::Admin, Some(key.as_bytes()), dice), send(owner, None), "{key}");
        }
    }

    #[test]
    fn reads_split_by_percentage_or_key_and_shadows_go_to_the_owner() {
        let dice = &mut Dice::new();
        for percentage in [0, 5, 25, 75, 100] {
            let strategy = config(|c| c.read_percentage = percentage);
            let target = (0..100_000)
                .filter(|_| strategy.route(CommandKind::Read, Some(b"k"), dice) == send(Side::Target, None))
                .count();
            let expected = percentage as usize * 1000;
            assert!(target.abs_diff(expected) < 1000, "{percentage}%: {target} of 100000");
        }
        let by_key = config(|c| (c.read_percentage, c.read_routing) = (50, ReadRouting::KeyHash));
        let first = by_key.route(CommandKind::Read, Some(b"stable"), dice);
        assert!((0..100).all(|_| by_key.route(CommandKind::Read, Some(b"stable"), dice) == first));

        let shadowed = config(|c| (c.read_percentage, c.shadow_read_percentage) = (100, 100));
        assert_eq!(
            shadowed.route(CommandKind::Read, Some(b"k"), dice),
            Route::Send { answer: Side::Source, mirror: None, shadow: true }
        );
        assert_eq!(shadowed.route(CommandKind::Connection, None, dice), send(Side::Source, None));
    }

    #[test]
    fn a_hold_stops_writes_only_and_past_its_bound_refuses_them() {
        let dice = &mut Dice::new();
        let new = config(|c| c.write_policy = WritePolicy::NewAuthoritative);
        for reason in [HoldReason::Paused, HoldReason::Unconfirmed] {
            let holding = Strategy { hold: HoldState::Holding(reason), ..new.clone() };
            for kind in [CommandKind::Write, CommandKind::Blocking, CommandKind::Other] {
                assert_eq!(holding.route(kind, Some(b"k"), dice), Route::Hold);
            }
            // Reads flow, from the key's owner.
            assert_eq!(holding.route(CommandKind::Read, Some(b"k"), dice), send(Side::Target, None));
            let refusing = Strategy { hold: HoldState::Refusing(reason), ..new.clone() };
            assert_eq!(refusing.route(CommandKind::Write, Some(b"k"), dice), Route::Refuse(reason));
            assert_eq!(refusing.route(CommandKind::Read, Some(b"k"), dice), send(Side::Target, None));
            assert_eq!(refusing.refusing(), Some(reason));
        }
        assert_eq!(Strategy::default().route(CommandKind::Write, Some(b"k"), dice), send(Side::Source, None));
    }

    #[test]
    fn reads_of_source_owned_keys_reach_the_target_only_for_clients_it_holds_the_writes_of() {
        use ClientWrites::*;
        let now = Instant::now();
        let answered = |ago_ms: u64| AnsweredAt(now - Duration::from_millis(ago_ms));
        let canary = config(|c| c.read_percentage = 100);
        assert!(canary.target_may_serve(Some(b"k"), Waiting), "no lag guard (data.type none): no gate");

        let covered =
            canary.clone().with_target_reads(TargetReads::CoveredBefore(Some(now - Duration::from_millis(20))));
        assert!(covered.target_may_serve(Some(b"k"), None));
        assert!(covered.target_may_serve(Some(b"k"), answered(21)), "answered before the covered instant");
        assert!(!covered.target_may_serve(Some(b"k"), answered(20)), "answered at it");
        assert!(!covered.target_may_serve(Some(b"k"), answered(5)), "after it: the target may not hold it yet");
        assert!(!covered.target_may_serve(Some(b"k"), Waiting), "a write still on its way");

        let stale = canary.with_target_reads(TargetReads::CoveredBefore(Option::None));
        assert!(!stale.target_may_serve(Some(b"k"), None), "outside the lag guard: nobody reads the target");

        let authoritative = config(|c| (c.read_percentage, c.write_policy) = (100, WritePolicy::NewAuthoritative))
            .with_target_reads(TargetReads::CoveredBefore(Option::None));
        assert!(authoritative.target_may_serve(Some(b"k"), Waiting), "the target owns the key: no gate");
    }

    #[test]
    fn keys_the_target_owns_are_read_there_whatever_the_read_share() {
        let dice = &mut Dice::new();
        let cut_over = config(|c| {
            (c.write_policy, c.read_percentage, c.mirror_writes) = (WritePolicy::NewAuthoritative, 25, true)
        });
        assert!((0..1000).all(|_| cut_over.route(CommandKind::Read, Some(b"k"), dice) == send(Side::Target, None)));
        let split = config(|c| (c.write_mode, c.write_percentage, c.read_percentage) = (WriteMode::Cutover, 50, 0));
        for i in 0..100 {
            let key = format!("key:{i}");
            let owner = if key_bucket(key.as_bytes()) < 50 { Side::Target } else { Side::Source };
            assert_eq!(split.route(CommandKind::Read, Some(key.as_bytes()), dice), send(owner, None), "{key}");
        }
    }

    #[test]
    fn without_needs_keys_no_answer_depends_on_the_key() {
        use CommandKind::*;
        let mut strategies = vec![Strategy::default()];
        for policy in [WritePolicy::OldAuthoritative, WritePolicy::NewAuthoritative] {
            for (read_percentage, mirror_writes) in [(0, false), (50, true), (100, true)] {
                strategies.push(config(|c| {
                    (c.write_policy, c.read_percentage, c.mirror_writes) = (policy, read_percentage, mirror_writes);
                    c.target_read_deadline_ms = Some(100);
                }));
            }
        }
        for strategy in strategies {
            assert!(!strategy.needs_keys(), "{strategy:?}");
            for key in ["k", "user:1", "{tag}x", "zset"].map(str::as_bytes) {
                for kind in [Read, Write, Blocking, Admin, Other, Transaction, PubSub, Connection] {
                    let (keyed, keyless) = (&mut Dice(7), &mut Dice(7));
                    assert_eq!(strategy.route(kind, Some(key), keyed), strategy.route(kind, None, keyless));
                }
                assert_eq!(strategy.transaction(Some(key)), strategy.transaction(None));
                assert_eq!(strategy.target_read_deadline(Some(key)), strategy.target_read_deadline(None));
                for writes in [ClientWrites::None, ClientWrites::Waiting] {
                    assert_eq!(strategy.target_may_serve(Some(key), writes), strategy.target_may_serve(None, writes));
                }
            }
        }
        assert!(config(|c| (c.write_mode, c.write_percentage) = (WriteMode::Cutover, 50)).needs_keys());
        assert!(config(|c| c.read_routing = ReadRouting::KeyHash).needs_keys());
        assert!(config(|c| c.shadow_read_percentage = 1).needs_keys());
    }

    #[test]
    fn in_a_split_without_replication_only_target_owned_keys_are_read_from_the_target() {
        let split = config(|c| {
            (c.read_percentage, c.write_mode, c.write_percentage, c.mirror_writes) = (100, WriteMode::Cutover, 50, true)
        });
        for i in 0..100 {
            let key = format!("key:{i}");
            let target_owned = key_bucket(key.as_bytes()) < 50;
            assert_eq!(split.target_may_serve(Some(key.as_bytes()), ClientWrites::None), target_owned, "{key}");
        }
        assert!(!split.target_may_serve(None, ClientWrites::None), "keyless: the source's, not mirrored");
        let replicated = split.with_target_reads(TargetReads::CoveredBefore(Some(Instant::now())));
        assert!(replicated.target_may_serve(None, ClientWrites::None), "replication feeds the target");
    }
}
