//! The sidecar learns the upstream's command table, so commands its built-in table lacks
//! classify by what the server says they do.

use std::time::Duration;

use eden_e2e::{RedisConfig, RedisServer};
use eden_sidecar::command::{self, CommandKind};
use eden_sidecar::command_info;
use eden_sidecar::upstream::{Credentials, Server, TlsSettings, Upstream};

#[tokio::test]
async fn commands_the_built_in_table_lacks_classify_from_the_servers_table() {
    let server = RedisServer::start().unwrap();
    let upstream = Upstream::new(&server.url(), &TlsSettings::default(), Duration::from_secs(2)).unwrap();
    // Known to Redis 7, absent from the built-in table.
    assert_eq!(CommandKind::of(b"restore-asking"), CommandKind::Other);
    assert_eq!(CommandKind::of(b"lolwut"), CommandKind::Other);

    let commands = command_info::fetch(&upstream).await.unwrap();
    assert!(commands.len() > 200, "a Redis 7 server reports its whole table, got {}", commands.len());
    let learned = command::learn(commands.clone());
    assert!(learned > 0 && learned < commands.len(), "only names the built-in table lacks: {learned}");

    assert_eq!(CommandKind::of(b"RESTORE-ASKING"), CommandKind::Write);
    assert_eq!(CommandKind::of(b"lolwut"), CommandKind::Read);
    assert_eq!(CommandKind::of(b"GET"), CommandKind::Read, "the built-in table still answers first");
    // Every command the server flags as reading or writing data now has a kind.
    for info in &commands {
        let flagged = info.flags.iter().any(|f| f == "write" || f == "readonly");
        if flagged {
            assert_ne!(CommandKind::of(info.name.as_bytes()), CommandKind::Other, "{info:?}");
        }
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_an_error_not_a_panic() {
    let port = eden_e2e::free_port().unwrap();
    let upstream =
        Upstream::new(&format!("redis://127.0.0.1:{port}"), &TlsSettings::default(), Duration::from_millis(500))
            .unwrap();
    let err = command_info::fetch(&upstream).await.unwrap_err();
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
}

/// A password-protected upstream: without credentials it refuses, and the learner gives up at
/// once (it used to ask again forever); with them (one [`Server`], the password apart from the
/// URI) the table is read.
#[tokio::test]
async fn a_protected_upstream_is_asked_with_its_credentials_and_a_refusal_is_final() {
    let password = "p@ss:w/rd %#+=?ü";
    let server = RedisServer::with_config(RedisConfig::default().directive("requirepass", "placeholder")).unwrap();
    let mut con = {
        let url = format!("redis://:placeholder@127.0.0.1:{}", server.port());
        redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
    };
    let _: () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg(password).query_async(&mut con).await.unwrap();

    let anonymous = Upstream::new(&server.url(), &TlsSettings::default(), Duration::from_secs(2)).unwrap();
    let refused = command_info::fetch(&anonymous).await.unwrap_err();
    assert!(refused.to_string().contains("NOAUTH"), "{refused}");
    tokio::time::timeout(Duration::from_secs(5), command_info::learn_from(anonymous))
        .await
        .expect("a refusal is not asked again");

    let protected = Server::parse(&server.url(), TlsSettings::default())
        .unwrap()
        .with_credentials(Some(Credentials { username: None, password: password.into() }));
    let upstream = Upstream::to(&protected, Duration::from_secs(2)).unwrap();
    assert!(command_info::fetch(&upstream).await.unwrap().len() > 200);
}
