//! A real Redis Cluster on loopback: `redis-server --cluster-enabled yes` processes joined by
//! `redis-cli --cluster create`, the Redis tools' own way, with replicas when asked for. Each
//! node is a [`RedisServer`], so a test can stop, freeze or restart one like any server.

use std::process::Command;
use std::time::Duration;

use crate::redis::find_on_path;
use crate::{FixtureError, RedisConfig, RedisServer, eventually, free_port};

/// A running cluster: its nodes, primaries first as `redis-cli --cluster create` assigns them.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    primaries: usize,
}

impl RedisCluster {
    /// Starts `primaries` primaries, each with `replicas` replicas, the 16384 slots spread
    /// evenly over the primaries; returns once every node says the cluster is ok.
    pub fn start(primaries: usize, replicas: usize) -> Result<Self, FixtureError> {
        let nodes = (0..primaries * (1 + replicas))
            .map(|_| {
                // The cluster bus gets a port of its own: the default, the node's port + 10000,
                // may be any other process's.
                let config = RedisConfig::default()
                    .directive("cluster-enabled", "yes")
                    .directive("cluster-config-file", "nodes.conf")
                    .directive("cluster-port", free_port()?.to_string())
                    .directive("cluster-node-timeout", "2000");
                RedisServer::with_config(config)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cli = find_on_path("redis-cli").ok_or(FixtureError::Missing {
            program: "redis-cli",
            hint: "run `make deps` (installs Debian's redis-tools)",
        })?;
        let output = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|node| node.addr().to_string()))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()?;
        if !output.status.success() {
            return Err(FixtureError::Failed {
                command: "redis-cli --cluster create".into(),
                stderr: String::from_utf8_lossy(&[output.stdout, output.stderr].concat()).into_owned(),
            });
        }
        let cluster = RedisCluster { nodes, primaries };
        for (i, node) in cluster.nodes.iter().enumerate() {
            eventually(&format!("cluster node {}", node.addr()), Duration::from_secs(30), || {
                let ok = info(node, "CLUSTER", "INFO").ok()?.contains("cluster_state:ok");
                // Every node has heard, by gossip, which nodes replicate which primary.
                let nodes = info(node, "CLUSTER", "NODES").ok()?;
                let replicas_known = nodes.lines().filter(|line| line.contains("slave")).count();
                // A replica counts once it has its primary's data (the cluster calls it online).
                let synced = i < primaries || info(node, "INFO", "replication").ok()?.contains("master_link_status:up");
                (ok && replicas_known == primaries * replicas && synced).then_some(())
            })?;
        }
        Ok(cluster)
    }

    /// Every node, primaries first.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes `redis-cli --cluster create` made primaries.
    pub fn primaries(&self) -> &[RedisServer] {
        &self.nodes[..self.primaries]
    }

    /// `redis://` URL of the first node: the seed a client or an Endpoint starts from.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }
}

/// `CLUSTER INFO`, `CLUSTER NODES` or `INFO <section>` of one node.
fn info(node: &RedisServer, command: &str, section: &str) -> redis::RedisResult<String> {
    let mut connection = redis::Client::open(node.url())?.get_connection()?;
    redis::cmd(command).arg(section).query(&mut connection)
}
