//! `eden.yaml`: the strategy the operator pushes to every sidecar of a migration (DESIGN §6).
//!
//! The data plane owns this format; the operator serializes the same type. A payload is
//! validated as a whole before it replaces the running one, so a bad edit can never leave a
//! sidecar half-configured: [`EdenConfig::from_yaml`] either returns a complete, consistent
//! configuration or says exactly what is wrong, and the caller keeps the last good one.
//!
//! Unknown fields are ignored rather than rejected, so an operator one version ahead can add a
//! field without stopping older sidecars from applying the rest.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One generation of a migration's strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdenConfig {
    /// Increases with every change; sidecars report the generation they applied.
    pub generation: u64,
    /// `namespace/name` of the Migration this configures.
    pub migration: String,
    pub source: UpstreamConfig,
    /// Absent until the operator knows the target (and then reads and writes stay on the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<UpstreamConfig>,
    /// Share of reads (0–100) served by the target.
    #[serde(default)]
    pub read_percentage: u32,
    /// How a read is assigned to a side.
    #[serde(default)]
    pub read_routing: ReadRouting,
    #[serde(default)]
    pub write_mode: WriteMode,
    #[serde(default)]
    pub write_policy: WritePolicy,
    /// `cutover` mode: share of keys (0–100, by key hash) whose writes the target owns.
    #[serde(default = "all")]
    pub write_percentage: u32,
    /// Whether writes are also sent, asynchronously, to the side that does not answer the client.
    /// Before cutover only when nothing else writes the target (`data.type: none`); after
    /// cutover, back to the source so a rollback loses nothing (DESIGN §4).
    #[serde(default)]
    pub mirror_writes: bool,
    /// Share of reads (0–100) also sent to the other side and compared.
    #[serde(default)]
    pub shadow_read_percentage: u32,
    #[serde(default)]
    pub writes: WritesState,
    /// The Migration's lag guard while replication feeds the target: reads of keys the source
    /// owns go to the target only while this sidecar sees it within the guard, and only for a
    /// client whose writes it already holds (DESIGN §9, "Freshness"). Absent when nothing
    /// replicates (`data.type: none`: the sidecars' own mirrors feed the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_ms: Option<u64>,
    /// A read sent to the target for a key the source owns is also sent to the source, and the
    /// source's answer is the client's when the target has not answered within this bound
    /// (DESIGN §9, "Deadlines"). Absent: target reads have no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_read_deadline_ms: Option<u64>,
}

/// How to reach one Redis server. Never carries a secret: credentials come from a mounted file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamConfig {
    /// `redis://host:port[/db]` or `rediss://host:port[/db]`.
    pub uri: String,
    /// A file holding the password (mounted from the Endpoint's Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadRouting {
    /// Each read independently, with probability `read_percentage`.
    #[default]
    Random,
    /// By key hash: one key always reads from one side, so a client never sees it go back in time.
    KeyHash,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Every write goes to the authoritative side named by `write_policy`.
    #[default]
    DualWrite,
    /// Writes split by key hash: `write_percentage` of keys are owned by the target.
    Cutover,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WritePolicy {
    /// The source answers the client.
    #[default]
    OldAuthoritative,
    /// The target answers the client.
    NewAuthoritative,
}

/// `paused` holds new writes in the sidecar (the cutover pause); reads continue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WritesState {
    #[default]
    Flowing,
    Paused,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("eden.yaml is not valid: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("eden.yaml {field} is {value}: {expected}")]
    Invalid { field: &'static str, value: String, expected: &'static str },
}

fn all() -> u32 {
    100
}

impl EdenConfig {
    /// Parses and validates a payload.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: EdenConfig = serde_yaml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// Checks what the type system cannot: ranges, URIs, and that anything sent to the target
    /// has a target to go to.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let percentages = [
            ("read_percentage", self.read_percentage),
            ("write_percentage", self.write_percentage),
            ("shadow_read_percentage", self.shadow_read_percentage),
        ];
        for (field, value) in percentages {
            if value > 100 {
                return Err(ConfigError::Invalid {
                    field,
                    value: value.to_string(),
                    expected: "a percentage, 0 to 100",
                });
            }
        }
        check_uri("source.uri", &self.source.uri)?;
        match &self.target {
            Some(target) => check_uri("target.uri", &target.uri)?,
            None if self.uses_target() => {
                return Err(ConfigError::Invalid {
                    field: "target",
                    value: "absent".into(),
                    expected: "a target, since reads, writes or mirrored writes are sent to it",
                });
            }
            None => {}
        }
        Ok(())
    }

    /// Whether this strategy sends anything to the target.
    pub fn uses_target(&self) -> bool {
        self.read_percentage > 0
            || self.shadow_read_percentage > 0
            || self.mirror_writes
            || self.write_policy == WritePolicy::NewAuthoritative
            || (self.write_mode == WriteMode::Cutover && self.write_percentage > 0)
    }
}

fn check_uri(field: &'static str, uri: &str) -> Result<(), ConfigError> {
    let rest = uri.strip_prefix("redis://").or_else(|| uri.strip_prefix("rediss://"));
    let host = rest.map(|rest| rest.split(['/', ':']).next().unwrap_or_default());
    if host.is_none_or(str::is_empty) {
        return Err(ConfigError::Invalid {
            field,
            value: uri.into(),
            expected: "redis://host:port[/db] or rediss://…",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of DESIGN §6, verbatim.
    const DESIGN_EXAMPLE: &str = r#"
generation: 7
migration: shop/ec2-to-azure
source: {uri: "redis://10.0.1.50:6379"}
target: {uri: "rediss://myredis.redis.cache.azure.com:6380", credentials_file: /var/run/eden/target/password}
read_percentage: 25
write_mode: dual_write          # dual_write | cutover
write_policy: old_authoritative # old_authoritative | new_authoritative
write_percentage: 100
shadow_read_percentage: 0
writes: flowing                 # flowing | paused
"#;

    #[test]
    fn the_design_example_parses() {
        let config = EdenConfig::from_yaml(DESIGN_EXAMPLE).unwrap();
        assert_eq!(config.generation, 7);
        assert_eq!(config.migration, "shop/ec2-to-azure");
        assert_eq!(config.read_percentage, 25);
        assert_eq!(config.write_mode, WriteMode::DualWrite);
        assert_eq!(config.writes, WritesState::Flowing);
        let target = config.target.as_ref().unwrap();
        assert_eq!(target.credentials_file.as_deref(), Some(std::path::Path::new("/var/run/eden/target/password")));
        assert_eq!(EdenConfig::from_yaml(&config.to_yaml().unwrap()).unwrap(), config, "round trip");
    }

    #[test]
    fn a_minimal_payload_is_a_plain_proxy_to_the_source() {
        let config = EdenConfig::from_yaml("generation: 1\nmigration: a/b\nsource: {uri: 'redis://s:6379'}\n").unwrap();
        assert!(!config.uses_target());
        assert_eq!((config.write_percentage, config.read_routing), (100, ReadRouting::Random));
    }

    #[test]
    fn out_of_range_and_inconsistent_payloads_say_what_is_wrong() {
        let cases = [
            (DESIGN_EXAMPLE.replace("read_percentage: 25", "read_percentage: 150"), "read_percentage is 150"),
            (DESIGN_EXAMPLE.replace("write_percentage: 100", "write_percentage: 101"), "write_percentage is 101"),
            (DESIGN_EXAMPLE.replace("redis://10.0.1.50:6379", "http://10.0.1.50"), "source.uri is http://10.0.1.50"),
            (DESIGN_EXAMPLE.replace("writes: flowing", "writes: sometimes"), "unknown variant `sometimes`"),
            (DESIGN_EXAMPLE.replace("read_percentage: 25", "read_percentage: -5"), "read_percentage"),
            ("generation: [\n".to_string(), "not valid"),
            (
                "generation: 1\nmigration: a/b\nsource: {uri: 'redis://s'}\nread_percentage: 5\n".to_string(),
                "target is absent",
            ),
        ];
        for (yaml, expected) in cases {
            let err = EdenConfig::from_yaml(&yaml).expect_err(expected).to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn unknown_fields_from_a_newer_operator_are_ignored() {
        let newer = format!("{DESIGN_EXAMPLE}some_future_knob: 3\n");
        assert_eq!(EdenConfig::from_yaml(&newer).unwrap(), EdenConfig::from_yaml(DESIGN_EXAMPLE).unwrap());
    }
}
