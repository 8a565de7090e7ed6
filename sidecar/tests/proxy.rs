//! Through the proxy, a real redis-server behaves exactly as it does directly: every stateful
//! feature a Redis client relies on, plus what the proxy adds (clear upstream errors, protocol
//! errors that close only the offending connection, metrics, graceful shutdown).

mod support;

use std::time::Duration;

use eden_e2e::{RedisConfig, RedisServer, TestPki};
use eden_sidecar::upstream::TlsSettings;
use futures::StreamExt;
use redis::AsyncCommands;
use support::{Proxy, RawClient, resp};

#[tokio::test]
async fn commands_and_a_large_pipeline_round_trip_in_order() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut conn = proxy.client().await;

    let _: () = conn.set("k", "v").await.unwrap();
    assert_eq!(conn.get::<_, String>("k").await.unwrap(), "v");

    let mut pipeline = redis::pipe();
    for i in 0..10_000 {
        pipeline.cmd("RPUSH").arg("list").arg(i).ignore();
    }
    pipeline.cmd("LRANGE").arg("list").arg(0).arg(-1);
    let (list,): (Vec<i64>,) = pipeline.query_async(&mut conn).await.unwrap();
    assert_eq!(list, (0..10_000).collect::<Vec<_>>(), "every command arrived, in order");

    let big = "x".repeat(4 * 1024 * 1024);
    let _: () = conn.set("big", &big).await.unwrap();
    assert_eq!(conn.get::<_, String>("big").await.unwrap().len(), big.len(), "values larger than any buffer");
}

#[tokio::test]
async fn inline_commands_work_as_on_redis() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut raw = proxy.raw().await;
    raw.send(b"PING\r\nSET greeting \"hello world\"\r\nGET greeting\r\n").await;
    raw.expect(b"+PONG\r\n+OK\r\n$11\r\nhello world\r\n").await;
}

#[tokio::test]
async fn a_subscriber_receives_published_messages() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let client = redis::Client::open(proxy.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("news").await.unwrap();
    pubsub.psubscribe("alerts.*").await.unwrap();

    let mut publisher = proxy.client().await;
    let _: i64 = publisher.publish("news", "first").await.unwrap();
    let _: i64 = publisher.publish("alerts.disk", "full").await.unwrap();

    let mut messages = pubsub.on_message();
    let first = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.unwrap().unwrap();
    assert_eq!((first.get_channel_name(), first.get_payload::<String>().unwrap()), ("news", "first".to_string()));
    let second = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.unwrap().unwrap();
    assert_eq!((second.get_channel_name(), second.get_payload::<String>().unwrap()), ("alerts.disk", "full".into()));
}

#[tokio::test]
async fn sharded_subscribe_works() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut subscriber = proxy.raw().await;
    subscriber.send(&resp(&["SSUBSCRIBE", "orders"])).await;
    subscriber.expect(b"*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n").await;
    let mut publisher = proxy.raw().await;
    publisher.send(&resp(&["SPUBLISH", "orders", "o-1"])).await;
    publisher.expect(b":1\r\n").await;
    subscriber.expect(b"*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$3\r\no-1\r\n").await;
}

#[tokio::test]
async fn a_transaction_is_aborted_by_a_watch_conflict() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut watcher = proxy.raw().await;
    let mut other = proxy.client().await;

    watcher.send(&resp(&["WATCH", "balance"])).await;
    watcher.expect(b"+OK\r\n").await;
    let _: () = other.set("balance", 100).await.unwrap();
    watcher.send(&[resp(&["MULTI"]), resp(&["SET", "balance", "0"]), resp(&["EXEC"])].concat()).await;
    watcher.expect(b"+OK\r\n+QUEUED\r\n*-1\r\n").await;
    assert_eq!(other.get::<_, i64>("balance").await.unwrap(), 100, "the aborted transaction wrote nothing");

    watcher.send(&[resp(&["MULTI"]), resp(&["INCRBY", "balance", "5"]), resp(&["EXEC"])].concat()).await;
    watcher.expect(b"+OK\r\n+QUEUED\r\n*1\r\n:105\r\n").await;
}

#[tokio::test]
async fn a_blocked_blpop_is_released_by_a_push_from_another_client() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut blocked = proxy.raw().await;
    blocked.send(&resp(&["BLPOP", "jobs", "5"])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut pusher = proxy.client().await;
    let _: i64 = pusher.rpush("jobs", "job-1").await.unwrap();
    blocked.expect(b"*2\r\n$4\r\njobs\r\n$5\r\njob-1\r\n").await;

    blocked.send(&resp(&["XREAD", "BLOCK", "5000", "STREAMS", "events", "$"])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _: String =
        redis::cmd("XADD").arg("events").arg("1-1").arg("f").arg("v").query_async(&mut pusher).await.unwrap();
    blocked.expect(b"*1\r\n*2\r\n$6\r\nevents\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n").await;
}

#[tokio::test]
async fn resp3_hello_and_client_tracking_push_frames_pass_through() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut tracked = proxy.raw().await;
    tracked.send(&resp(&["HELLO", "3"])).await;
    // The HELLO 3 reply is a RESP3 map; read up to the protocol field to see it switched.
    let mut hello = Vec::new();
    while !String::from_utf8_lossy(&hello).contains(":3\r\n") {
        let mut chunk = [0u8; 1024];
        let n = tokio::io::AsyncReadExt::read(&mut tracked.stream, &mut chunk).await.unwrap();
        hello.extend_from_slice(&chunk[..n]);
    }
    assert!(hello.starts_with(b"%"), "a RESP3 map: {:?}", String::from_utf8_lossy(&hello));
    let hello = String::from_utf8_lossy(&hello).into_owned();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Whatever followed the map's proto field belongs to it; start clean.
    let mut rest = [0u8; 4096];
    let _ =
        tokio::time::timeout(Duration::from_millis(50), tokio::io::AsyncReadExt::read(&mut tracked.stream, &mut rest))
            .await;
    assert!(hello.contains("proto"), "{hello}");

    tracked.send(&resp(&["CLIENT", "TRACKING", "on"])).await;
    tracked.expect(b"+OK\r\n").await;
    tracked.send(&resp(&["GET", "watched"])).await;
    tracked.expect(b"_\r\n").await;

    let mut writer = proxy.client().await;
    let _: () = writer.set("watched", "changed").await.unwrap();
    tracked.expect(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\nwatched\r\n").await;
}

#[tokio::test]
async fn auth_and_select_are_per_connection_state_passed_through() {
    let server = RedisServer::with_config(RedisConfig::default().directive("requirepass", "s3cret")).unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut raw = proxy.raw().await;
    raw.send(&resp(&["GET", "k"])).await;
    raw.expect(b"-NOAUTH Authentication required.\r\n").await;
    raw.send(&[resp(&["AUTH", "wrong"]), resp(&["AUTH", "s3cret"])].concat()).await;
    raw.expect(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n+OK\r\n").await;
    raw.send(
        &[resp(&["SELECT", "3"]), resp(&["SET", "k", "in-db-3"]), resp(&["SELECT", "0"]), resp(&["EXISTS", "k"])]
            .concat(),
    )
    .await;
    raw.expect(b"+OK\r\n+OK\r\n+OK\r\n:0\r\n").await;

    let mut other = proxy.raw().await;
    other.send(&resp(&["PING"])).await;
    other.expect(b"-NOAUTH Authentication required.\r\n").await;
}

#[tokio::test]
async fn a_database_in_the_upstream_uri_is_selected_on_connect() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&format!("{}/5", server.url())).await;
    let mut conn = proxy.client().await;
    let _: () = conn.set("where", "five").await.unwrap();
    let mut direct =
        redis::Client::open(format!("{}/5", server.url())).unwrap().get_multiplexed_async_connection().await.unwrap();
    assert_eq!(direct.get::<_, String>("where").await.unwrap(), "five");
}

#[tokio::test]
async fn a_tls_upstream_is_reached_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&["127.0.0.1", "redis.internal"]).unwrap();
    let files = pki.write_to(dir.path()).unwrap();
    let server = RedisServer::with_config(RedisConfig::default().tls(&files.ca, &files.cert, &files.key)).unwrap();

    let trusted = TlsSettings {
        ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        server_name: Some("redis.internal".into()),
        ..Default::default()
    };
    let proxy = Proxy::with_tls(&server.url(), trusted).await;
    let mut conn = proxy.client().await;
    let _: () = conn.set("secure", "yes").await.unwrap();
    assert_eq!(conn.get::<_, String>("secure").await.unwrap(), "yes");

    let untrusted = Proxy::with_tls(&server.url(), TlsSettings::default()).await;
    let mut raw = untrusted.raw().await;
    raw.send(&resp(&["PING"])).await;
    let reply = raw.read_line().await;
    assert!(reply.starts_with("-ERR eden: upstream 127.0.0.1:") && reply.contains("TLS failed"), "{reply}");
}

#[tokio::test]
async fn an_upstream_restart_never_takes_the_proxy_down() {
    let mut server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut connected = proxy.raw().await;
    connected.send(&resp(&["PING"])).await;
    connected.expect(b"+PONG\r\n").await;

    server.stop();
    assert_eq!(connected.read_to_close().await, "", "a closed upstream closes its client");

    let mut waiting = proxy.raw().await;
    waiting.send(&resp(&["PING"])).await;
    let reply = waiting.read_line().await;
    assert_eq!(
        reply,
        format!("-ERR eden: upstream 127.0.0.1:{} unreachable: Connection refused (os error 111)", server.port())
    );
    assert_eq!(
        proxy.metrics.render().lines().find(|l| l.contains("upstream_unreachable")).unwrap(),
        "eden_errors_total{kind=\"upstream_unreachable\"} 1"
    );

    server.restart().unwrap();
    waiting.send(&resp(&["PING"])).await;
    waiting.expect(b"+PONG\r\n").await;
}

#[tokio::test]
async fn malformed_input_closes_only_that_connection() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut bystander = proxy.raw().await;
    bystander.send(&resp(&["SET", "k", "1"])).await;
    bystander.expect(b"+OK\r\n").await;

    let mut offender = proxy.raw().await;
    offender.send(&[resp(&["INCR", "k"]), b"*1\r\n$-5\r\n".to_vec()].concat()).await;
    assert_eq!(
        offender.read_to_close().await,
        ":2\r\n-ERR Protocol error: invalid bulk length\r\n",
        "earlier replies first, then the error"
    );

    let mut unconnected = proxy.raw().await;
    unconnected.send(b"*2\r\n:1\r\n").await;
    assert_eq!(unconnected.read_to_close().await, "-ERR Protocol error: expected '$', got ':'\r\n");

    bystander.send(&resp(&["INCR", "k"])).await;
    bystander.expect(b":3\r\n").await;
    assert!(proxy.metrics.render().contains("eden_errors_total{kind=\"protocol\"} 2"));
}

#[tokio::test]
async fn protocol_errors_read_exactly_as_redis_server_writes_them() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let inputs: [&[u8]; 6] = [
        b"*2\r\n:1\r\n",
        b"*x\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$03\r\nGET\r\n",
        b"*01\r\n$4\r\nPING\r\n",
        b"*1\r\n$536870913\r\n",
    ];
    for input in inputs {
        let mut direct = RawClient::connect(server.addr()).await;
        direct.send(input).await;
        let mut proxied = proxy.raw().await;
        proxied.send(input).await;
        let expected = direct.read_to_close().await;
        assert!(expected.starts_with("-ERR Protocol error"), "{expected}");
        assert_eq!(proxied.read_to_close().await, expected, "for {:?}", String::from_utf8_lossy(input));
    }
}

#[tokio::test]
async fn quit_closes_the_connection_after_its_reply() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut raw = proxy.raw().await;
    raw.send(&[resp(&["PING"]), resp(&["QUIT"])].concat()).await;
    assert_eq!(raw.read_to_close().await, "+PONG\r\n+OK\r\n");
}

#[tokio::test]
async fn metrics_count_commands_by_kind_and_connections() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut raw = proxy.raw().await;
    raw.send(&[resp(&["SET", "a", "1"]), resp(&["GET", "a"]), resp(&["GET", "a"]), resp(&["PING"])].concat()).await;
    raw.expect(b"+OK\r\n$1\r\n1\r\n$1\r\n1\r\n+PONG\r\n").await;
    let metrics = proxy.metrics.render();
    for line in [
        "eden_commands_total{route=\"source\",kind=\"read\"} 2",
        "eden_commands_total{route=\"source\",kind=\"write\"} 1",
        "eden_commands_total{route=\"source\",kind=\"connection\"} 1",
        "eden_commands_total{route=\"source\",kind=\"blocking\"} 0",
        "eden_connections_active 1",
        "eden_proxy_latency_seconds_count 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_replies_arrive_then_closes() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut slow = proxy.raw().await;
    slow.send(&resp(&["BLPOP", "nothing", "0.3"])).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let addr = proxy.addr;
    let shutdown = tokio::spawn(proxy.shutdown());
    assert_eq!(slow.read_to_close().await, "*-1\r\n", "the reply in flight was delivered");
    shutdown.await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no new connections after shutdown");
}

#[tokio::test]
async fn scripting_wait_and_reset_pass_through() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut raw = proxy.raw().await;
    raw.send(&resp(&["EVAL", "return redis.call('INCRBY', KEYS[1], ARGV[1])", "1", "counter", "7"])).await;
    raw.expect(b":7\r\n").await;
    let library =
        "#!lua name=eden\nredis.register_function('double', function(keys) return 2 * redis.call('GET', keys[1]) end)";
    raw.send(&[resp(&["FUNCTION", "LOAD", library]), resp(&["FCALL", "double", "1", "counter"])].concat()).await;
    raw.expect(b"$4\r\neden\r\n:14\r\n").await;
    raw.send(&resp(&["WAIT", "0", "100"])).await;
    raw.expect(b":0\r\n").await;
    raw.send(&[resp(&["SELECT", "2"]), resp(&["RESET"]), resp(&["SET", "after-reset", "db0"])].concat()).await;
    raw.expect(b"+OK\r\n+RESET\r\n+OK\r\n").await;
    let mut db0 = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    assert_eq!(db0.get::<_, String>("after-reset").await.unwrap(), "db0", "RESET returned the connection to db 0");
}

#[tokio::test]
async fn clients_can_connect_over_a_unix_socket() {
    use eden_sidecar::server::{self, Backend, Listener};
    use eden_sidecar::upstream::Upstream;

    let server = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eden.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let upstream = Upstream::new(&server.url(), &TlsSettings::default(), Duration::from_secs(1)).unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let served =
        tokio::spawn(server::serve(Listener::Unix(listener), Backend::Plain(upstream), Default::default(), shutdown));

    let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut client, &[resp(&["SET", "via", "unix"]), resp(&["GET", "via"])].concat())
        .await
        .unwrap();
    let mut reply = vec![0u8; 15];
    tokio::io::AsyncReadExt::read_exact(&mut client, &mut reply).await.unwrap();
    assert_eq!(reply, b"+OK\r\n$4\r\nunix\r\n");
    stop.send(true).unwrap();
    served.await.unwrap();
}

#[tokio::test]
async fn a_client_that_disconnects_while_blocked_consumes_nothing() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(&server.url()).await;
    let mut gone = proxy.raw().await;
    gone.send(&resp(&["BLPOP", "jobs", "0"])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut pusher = proxy.client().await;
    let _: i64 = pusher.rpush("jobs", "job-1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pusher.llen::<_, i64>("jobs").await.unwrap(), 1, "the job waits for a live consumer, as on Redis");
}
