//! The sidecar learns the upstream's command table, so commands its built-in table lacks
//! classify by what the server says they do.

use std::time::Duration;

use eden_e2e::RedisServer;
use eden_sidecar::command::{self, CommandKind};
use eden_sidecar::command_info;
use eden_sidecar::upstream::{TlsSettings, Upstream};

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
