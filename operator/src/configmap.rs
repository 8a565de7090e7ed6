//! The ConfigMap `eden-<migration>` that carries the strategy to the sidecars (DESIGN §6).
//!
//! The payload type belongs to the data plane ([`eden_sidecar::config::EdenConfig`]); this
//! module turns a phase-machine decision into that payload and decides when the generation
//! moves: only when what the sidecars must do changes, so an idle reconcile never makes every
//! sidecar re-apply and re-acknowledge.

use std::collections::BTreeMap;

use eden_sidecar::config::{EdenConfig, UpstreamConfig, WriteMode, WritePolicy, WritesState};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;

use crate::crd::{DataCopy, Migration};
use crate::migration::phase::{Effective, Writes};

/// The one key of the ConfigMap.
pub const PAYLOAD_KEY: &str = "eden.yaml";

/// The ConfigMap's name for a Migration.
pub fn name(migration: &Migration) -> String {
    format!("eden-{}", migration.name_any())
}

/// The payload for `effective`, at generation 0 (see [`next_generation`]).
pub fn payload(
    migration: &Migration,
    source: UpstreamConfig,
    target: UpstreamConfig,
    effective: &Effective,
) -> EdenConfig {
    let (write_mode, write_policy, write_percentage, mirror_writes, writes) = match effective.writes {
        Writes::Source { mirror_to_target } => {
            (WriteMode::DualWrite, WritePolicy::OldAuthoritative, 100, mirror_to_target, WritesState::Flowing)
        }
        Writes::Paused => (WriteMode::DualWrite, WritePolicy::OldAuthoritative, 100, false, WritesState::Paused),
        Writes::Target { mirror_to_source } => {
            (WriteMode::DualWrite, WritePolicy::NewAuthoritative, 100, mirror_to_source, WritesState::Flowing)
        }
        Writes::Split { percentage } => {
            (WriteMode::Cutover, WritePolicy::OldAuthoritative, percentage as u32, true, WritesState::Flowing)
        }
    };
    EdenConfig {
        generation: 0,
        migration: format!("{}/{}", migration.namespace().unwrap_or_default(), migration.name_any()),
        source,
        target: Some(target),
        read_percentage: effective.read_percentage as u32,
        read_routing: Default::default(),
        write_mode,
        write_policy,
        write_percentage,
        mirror_writes,
        shadow_read_percentage: effective.shadow_read_percentage as u32,
        writes,
        max_lag_ms: (migration.spec.data.type_ != DataCopy::None)
            .then_some(migration.spec.cutover.max_lag_millis.max(0) as u64),
        target_read_deadline_ms: Some(migration.spec.strategy.target_read_deadline_millis.max(1) as u64),
    }
}

/// The generation `desired` should carry, given what the ConfigMap holds now and `floor`, the
/// highest generation any sidecar applied or this process wrote: the same one when nothing the
/// sidecars act on changed (and no `barrier` is asked for), else one above both. Generations
/// only go forward, so a ConfigMap that was deleted or corrupted is rewritten above every
/// generation a sidecar ever acknowledged, and an old acknowledgement never counts for a new
/// strategy.
pub fn next_generation(current: Option<&EdenConfig>, desired: &EdenConfig, floor: u64, barrier: bool) -> u64 {
    match current {
        Some(current)
            if !barrier
                && current.generation >= floor
                && EdenConfig { generation: current.generation, ..desired.clone() } == *current =>
        {
            current.generation
        }
        Some(current) => current.generation.max(floor) + 1,
        None => floor + 1,
    }
}

/// The payload a ConfigMap holds, if it holds a valid one.
pub fn read(config_map: &ConfigMap) -> Option<EdenConfig> {
    let text = config_map.data.as_ref()?.get(PAYLOAD_KEY)?;
    EdenConfig::from_yaml(text).ok()
}

/// The ConfigMap object for `payload`, owned by `migration` (see [`crate::owned`]).
pub fn build(migration: &Migration, payload: &EdenConfig) -> Result<ConfigMap, eden_sidecar::config::ConfigError> {
    Ok(ConfigMap {
        metadata: crate::owned::metadata(migration, name(migration)),
        data: Some(BTreeMap::from([(PAYLOAD_KEY.to_string(), payload.to_yaml()?)])),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::MigrationSpec;

    fn migration() -> Migration {
        let spec: MigrationSpec = serde_json::from_value(serde_json::json!({
            "source": {"endpointRef": {"name": "old"}},
            "target": {"endpointRef": {"name": "new"}},
        }))
        .unwrap();
        let mut migration = Migration::new("cache", spec);
        migration.metadata.namespace = Some("shop".into());
        migration.metadata.uid = Some("0000-1111".into());
        migration
    }

    fn upstream(uri: &str) -> UpstreamConfig {
        UpstreamConfig { uri: uri.into(), credentials_file: None }
    }

    fn payload_for(writes: Writes, read_percentage: i32) -> EdenConfig {
        let effective = Effective { read_percentage, shadow_read_percentage: 0, writes };
        payload(&migration(), upstream("redis://old:6379"), upstream("redis://new:6379"), &effective)
    }

    #[test]
    fn each_kind_of_write_routing_maps_to_the_sidecar_payload() {
        let before = payload_for(Writes::Source { mirror_to_target: false }, 25);
        assert_eq!(
            (before.write_policy, before.mirror_writes, before.writes),
            (WritePolicy::OldAuthoritative, false, WritesState::Flowing)
        );
        assert_eq!(before.read_percentage, 25);
        assert_eq!(before.migration, "shop/cache");

        let held = payload_for(Writes::Paused, 25);
        assert_eq!(held.writes, WritesState::Paused);

        let after = payload_for(Writes::Target { mirror_to_source: true }, 100);
        assert_eq!((after.write_policy, after.mirror_writes), (WritePolicy::NewAuthoritative, true));

        let split = payload_for(Writes::Split { percentage: 30 }, 0);
        assert_eq!((split.write_mode, split.write_percentage, split.mirror_writes), (WriteMode::Cutover, 30, true));

        for payload in [before, held, after, split] {
            payload.validate().expect("every payload the operator writes is one the sidecar accepts");
        }
    }

    #[test]
    fn the_generation_moves_only_when_the_strategy_changes() {
        let first = payload_for(Writes::Source { mirror_to_target: false }, 0);
        assert_eq!(next_generation(None, &first, 0, false), 1);
        let stored = EdenConfig { generation: 1, ..first.clone() };
        assert_eq!(next_generation(Some(&stored), &first, 1, false), 1, "an idle reconcile keeps the generation");
        let changed = payload_for(Writes::Source { mirror_to_target: false }, 5);
        assert_eq!(next_generation(Some(&stored), &changed, 1, false), 2);
        assert_eq!(next_generation(Some(&stored), &first, 1, true), 2, "a barrier moves it without a change");
    }

    #[test]
    fn generations_only_go_forward_past_every_acknowledgement() {
        let desired = payload_for(Writes::Paused, 0);
        // The ConfigMap was deleted (or corrupted) after sidecars had applied generation 7.
        assert_eq!(next_generation(None, &desired, 7, false), 8);
        // Someone rewrote it by hand at a lower generation, with the operator's own content.
        let rewritten = EdenConfig { generation: 2, ..desired.clone() };
        assert_eq!(next_generation(Some(&rewritten), &desired, 7, false), 8);
    }

    #[test]
    fn the_config_map_is_owned_by_its_migration_and_round_trips() {
        let migration = migration();
        let payload = EdenConfig { generation: 4, ..payload_for(Writes::Paused, 10) };
        let config_map = build(&migration, &payload).unwrap();
        assert_eq!(config_map.metadata.name.as_deref(), Some("eden-cache"));
        assert_eq!(config_map.metadata.namespace.as_deref(), Some("shop"));
        let owner = &config_map.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("Migration", "cache", Some(true)));
        assert_eq!(read(&config_map), Some(payload));
    }
}
