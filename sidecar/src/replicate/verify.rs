//! The verifier: are the source and the target equal, key by key?
//!
//! Pass one SCANs the source and, per batch, reads TYPE, PTTL and MEMORY USAGE on both servers
//! in one pipelined round trip each, then DUMP payloads of the smaller values (equal payloads mean
//! equal values); differing payloads and big values get a semantic, chunked comparison
//! ([`super::compare`]). Pass two SCANs the target for keys the source lacks. Data keeps changing
//! under live writes, so a report lists the differing keys and [`Verifier::recheck`] looks at just
//! those again. A key due to expire within the TTL tolerance may be gone from the server read
//! second, so it is not reported missing there. The records Eden keeps on the target (sync mode's
//! position, [`super::POSITION_KEY`], and the freshness record, [`super::FRESHNESS_KEY`]) are its
//! bookkeeping, not data, and are not reported.

use redis::pipe;
use serde::Serialize;
use tracing::{Instrument, info, info_span};

use super::endpoint::{Endpoint, as_bytes, printable};
use super::keys;
use super::pace::Pace;
use super::{KeptKeys, Key, KeyType, ReplicateError, compare, eden_own};
use crate::upstream::Server;
use std::num::NonZeroU32;

/// Tuning for [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Keys per SCAN step and per pipelined round trip.
    pub batch: usize,
    /// Keys per second at most; `None` for no limit.
    pub rate_limit: Option<u32>,
    /// TTLs differing by more than this many ms are reported.
    pub ttl_tolerance_ms: u64,
    /// Differences kept with details in [`VerifyReport::samples`].
    pub max_samples: usize,
    /// Differing keys kept for [`Verifier::recheck`]; beyond this a recheck verifies everything.
    pub max_recheck: usize,
    /// MEMORY USAGE above which values are compared in chunks instead of by DUMP.
    pub big_key_bytes: u64,
    /// Elements per chunk for big values.
    pub chunk: usize,
    /// The keys a `skip` replication kept: the target's own values, not compared (counted in
    /// [`VerifyReport::kept`]).
    pub kept: Option<KeptKeys>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            batch: 200,
            rate_limit: None,
            ttl_tolerance_ms: 1000,
            max_samples: 20,
            max_recheck: 10_000,
            big_key_bytes: 16 << 20,
            chunk: 1000,
            kept: None,
        }
    }
}

/// What kind of difference a key has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// On the source, not on the target.
    Missing,
    /// On the target, not on the source.
    Extra,
    TypeMismatch,
    ValueMismatch,
    TtlMismatch,
}

/// One differing key, with a human-readable detail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub key: String,
    pub kind: DifferenceKind,
    pub detail: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Source keys examined.
    pub checked: u64,
    /// Keys not compared because `skip` kept the target's value (not differences).
    pub kept: u64,
    pub missing: u64,
    pub extra: u64,
    pub type_mismatch: u64,
    pub value_mismatch: u64,
    pub ttl_mismatch: u64,
    /// The first differences found, with details (at most `max_samples`).
    pub samples: Vec<Difference>,
    /// Every differing key, up to `max_recheck`.
    #[serde(skip)]
    differing: Vec<Key>,
    /// More keys differed than `differing` holds.
    pub truncated: bool,
}

impl VerifyReport {
    /// All differences counted.
    pub fn differences(&self) -> u64 {
        self.missing + self.extra + self.type_mismatch + self.value_mismatch + self.ttl_mismatch
    }

    pub fn is_clean(&self) -> bool {
        self.differences() == 0
    }

    fn record(&mut self, options: &VerifyOptions, key: &[u8], kind: DifferenceKind, detail: String) {
        let counter = match kind {
            DifferenceKind::Missing => &mut self.missing,
            DifferenceKind::Extra => &mut self.extra,
            DifferenceKind::TypeMismatch => &mut self.type_mismatch,
            DifferenceKind::ValueMismatch => &mut self.value_mismatch,
            DifferenceKind::TtlMismatch => &mut self.ttl_mismatch,
        };
        *counter += 1;
        if self.samples.len() < options.max_samples {
            self.samples.push(Difference { key: printable(key), kind, detail });
        }
        if self.differing.last().map(Vec::as_slice) != Some(key) {
            if self.differing.len() < options.max_recheck {
                self.differing.push(key.to_vec());
            } else {
                self.truncated = true;
            }
        }
    }
}

/// Compares a source and a target.
pub struct Verifier {
    source: Endpoint,
    target: Endpoint,
    options: VerifyOptions,
}

impl Verifier {
    /// Connects to both servers, each with its own credentials and TLS settings.
    pub async fn connect(source: &Server, target: &Server, options: VerifyOptions) -> Result<Self, ReplicateError> {
        Ok(Verifier {
            source: Endpoint::connect("source", source).await?,
            target: Endpoint::connect("target", target).await?,
            options,
        })
    }

    /// Verifies every key on both servers.
    pub async fn run(&self) -> Result<VerifyReport, ReplicateError> {
        let span = info_span!("verify", source = %self.source.label(), target = %self.target.label());
        async {
            let mut report = VerifyReport::default();
            let pace = Pace::new(self.options.rate_limit.and_then(NonZeroU32::new));
            let mut cursor = 0;
            loop {
                let (next, found) = keys::scan(&self.source, cursor, self.options.batch).await?;
                self.check(&found, &mut report).await?;
                pace.spend(found.len()).await;
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            loop {
                let (next, mut found) = keys::scan(&self.target, cursor, self.options.batch).await?;
                found.retain(|key| !eden_own(key));
                let scanned = found.len();
                let on_source = keys::exists(&self.source, &found).await?;
                let only_on_target: Vec<Key> =
                    found.into_iter().zip(on_source).filter(|(_, on)| !on).map(|(key, _)| key).collect();
                let infos = keys::inspect(&self.target, &only_on_target).await?;
                for (key, info) in only_on_target.iter().zip(infos) {
                    if info.kind.is_some() && self.kept(key) {
                        report.kept += 1;
                    } else if info.kind.is_some() && !self.expiring(info.pttl) {
                        report.record(&self.options, key, DifferenceKind::Extra, "not on the source".into());
                    }
                }
                pace.spend(scanned).await;
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            info!(
                checked = report.checked,
                kept = report.kept,
                differences = report.differences(),
                "verification finished"
            );
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Checks again only the keys that differed in `previous` (everything, if that report was
    /// truncated).
    pub async fn recheck(&self, previous: &VerifyReport) -> Result<VerifyReport, ReplicateError> {
        if previous.truncated {
            return self.run().await;
        }
        let mut report = VerifyReport::default();
        for batch in previous.differing.chunks(self.options.batch) {
            self.check(batch, &mut report).await?;
        }
        Ok(report)
    }

    /// Whether `skip` kept the target's `key`: its value is the target's own, on purpose.
    fn kept(&self, key: &[u8]) -> bool {
        self.options.kept.as_ref().is_some_and(|kept| kept.contains(self.target.db() as u64, key))
    }

    /// Whether a key with this PTTL is due to expire within the TTL tolerance. The servers are
    /// read one after the other, so such a key may be gone from the second by then: that is not
    /// a difference.
    fn expiring(&self, pttl: i64) -> bool {
        (0..=self.options.ttl_tolerance_ms as i64).contains(&pttl)
    }

    /// Compares each key's presence, type, TTL and value.
    async fn check(&self, batch: &[Key], report: &mut VerifyReport) -> Result<(), ReplicateError> {
        let (source, target) = (keys::inspect(&self.source, batch).await?, keys::inspect(&self.target, batch).await?);
        let mut to_dump = Vec::new();
        for ((key, s), t) in batch.iter().zip(source).zip(target) {
            report.checked += 1;
            let (kind, other) = match (s.kind, t.kind) {
                (None, None) => continue,
                (_, Some(_)) if self.kept(key) => {
                    report.kept += 1;
                    continue;
                }
                (None, Some(_)) if self.expiring(t.pttl) => continue,
                (Some(_), None) if self.expiring(s.pttl) => continue,
                (None, Some(_)) => {
                    report.record(&self.options, key, DifferenceKind::Extra, "not on the source".into());
                    continue;
                }
                (Some(_), None) => {
                    report.record(&self.options, key, DifferenceKind::Missing, "not on the target".into());
                    continue;
                }
                (Some(a), Some(b)) => (a, b),
            };
            if kind != other {
                let detail = format!("{kind:?} on source, {other:?} on target");
                report.record(&self.options, key, DifferenceKind::TypeMismatch, detail);
                continue;
            }
            let ttl_differs = match (s.pttl, t.pttl) {
                (a, b) if a < 0 || b < 0 => (a < 0) != (b < 0),
                (a, b) => a.abs_diff(b) > self.options.ttl_tolerance_ms,
            };
            if ttl_differs {
                let detail = format!("PTTL {} on source, {} on target", s.pttl, t.pttl);
                report.record(&self.options, key, DifferenceKind::TtlMismatch, detail);
            }
            if s.is_big(self.options.big_key_bytes) {
                self.compare(key, kind, report).await?;
            } else {
                to_dump.push((key, kind));
            }
        }
        let mut dump = pipe();
        for (key, _) in &to_dump {
            dump.cmd("DUMP").arg(*key);
        }
        let (a, b) = (self.source.pipe("DUMP", &mut dump).await?, self.target.pipe("DUMP", &mut dump).await?);
        for (((key, kind), a), b) in to_dump.iter().zip(a).zip(b) {
            let equal = matches!((as_bytes(&a), as_bytes(&b)), (Some(a), Some(b)) if a == b);
            if !equal {
                self.compare(key, *kind, report).await?;
            }
        }
        Ok(())
    }

    async fn compare(&self, key: &[u8], kind: KeyType, report: &mut VerifyReport) -> Result<(), ReplicateError> {
        if let Some(detail) = compare::differs(&self.source, &self.target, key, kind, self.options.chunk).await? {
            report.record(&self.options, key, DifferenceKind::ValueMismatch, detail);
        }
        Ok(())
    }
}
