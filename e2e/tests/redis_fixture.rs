//! The redis-server fixture is a real server: commands round-trip, and stop/restart keep the
//! port, which the sidecar's upstream-restart tests rely on.

use eden_e2e::{RedisCluster, RedisConfig, RedisServer};
use redis::AsyncCommands;

async fn connect(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(server.url()).expect("valid url");
    client.get_multiplexed_async_connection().await.expect("connects")
}

#[tokio::test]
async fn commands_round_trip_against_a_real_server() {
    let server = RedisServer::start().expect("redis-server starts");
    let mut conn = connect(&server).await;

    let _: () = conn.set("greeting", "hello").await.unwrap();
    let got: String = conn.get("greeting").await.unwrap();
    assert_eq!(got, "hello");

    let counter: i64 = conn.incr("counter", 41).await.unwrap();
    assert_eq!(conn.incr::<_, _, i64>("counter", 1).await.unwrap(), counter + 1);

    let _: () = conn.rpush("list", &["a", "b", "c"]).await.unwrap();
    let list: Vec<String> = conn.lrange("list", 0, -1).await.unwrap();
    assert_eq!(list, ["a", "b", "c"]);

    let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.unwrap();
    assert!(info.contains(&format!("tcp_port:{}", server.port())), "INFO names our port: {info}");
}

#[tokio::test]
async fn configuration_directives_reach_the_server() {
    let server = RedisServer::with_config(RedisConfig::default().directive("notify-keyspace-events", "KEA")).unwrap();
    let mut conn = connect(&server).await;
    let setting: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut conn).await.unwrap();
    assert_eq!(setting[0], "notify-keyspace-events");
    let mut flags: Vec<char> = setting[1].chars().collect();
    flags.sort_unstable();
    assert_eq!(flags, ['A', 'E', 'K'], "got {:?}", setting[1]);
}

#[tokio::test]
async fn restart_keeps_the_port_and_starts_empty() {
    let mut server = RedisServer::start().unwrap();
    let port = server.port();
    let mut conn = connect(&server).await;
    let _: () = conn.set("before", 1).await.unwrap();

    server.stop();
    assert!(std::net::TcpStream::connect(server.addr()).is_err(), "nothing listens while stopped");

    server.restart().unwrap();
    assert_eq!(server.port(), port);
    let mut conn = connect(&server).await;
    let exists: bool = conn.exists("before").await.unwrap();
    assert!(!exists, "a restarted server has no persistence");
}

#[tokio::test]
async fn a_cluster_has_every_slot_served_by_its_primaries_each_with_its_replica() {
    let cluster = RedisCluster::start(3, 1).unwrap();
    assert_eq!(cluster.nodes().len(), 6);
    for (i, node) in cluster.nodes().iter().enumerate() {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut connect(node).await).await.unwrap();
        let expected = if i < cluster.primaries().len() { "master" } else { "slave" };
        assert_eq!(role[0], redis::Value::BulkString(expected.into()), "node {i}: {role:?}");
    }
    let info: String =
        redis::cmd("CLUSTER").arg("INFO").query_async(&mut connect(&cluster.nodes()[0]).await).await.unwrap();
    assert!(info.contains("cluster_slots_assigned:16384") && info.contains("cluster_size:3"), "{info}");
}
