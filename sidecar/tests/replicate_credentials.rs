//! A user and a password holding any character Redis accepts (`@ : / % # + = ?`, spaces,
//! non-ASCII) reach both servers through every connection the engine opens (the sync link, scan
//! mode's client and raw links, the verifier, the freshness record), whether given
//! percent-encoded in a URI or as credentials of their own (a Secret's, a file's); and a wrong
//! one is reported naming the server, with the password in no error and no log line.

mod support_replicate;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use eden_e2e::RedisServer;
use eden_sidecar::replicate::{Mode, Replicator, ReplicatorOptions, Verifier, VerifyOptions};
use eden_sidecar::upstream::{Credentials, Server, TlsSettings};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use support_replicate::{Pair, assert_clean, caught_up, seed_every_type, seed_strings};

/// Redis refuses spaces in user names, not in passwords.
const USER: &str = "app:ü@#%+=?/";
/// An Azure access key is base64: `+`, `/` and `=` as well.
const PASSWORD: &str = "p@ss:w/rd %#+=?ü✓ Zm9v+/==";

/// Every log line the engine writes in this test binary.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn credentials(password: &str) -> Credentials {
    Credentials { username: Some(USER.into()), password: password.into() }
}

/// The server's only user is [`USER`]: the default user is switched off.
async fn protect(server: &RedisServer) -> MultiplexedConnection {
    let mut con = support_replicate::connect(server).await;
    let password = format!(">{PASSWORD}");
    let args = ["SETUSER", USER, "on", &password, "~*", "&*", "+@all"];
    let _: () = redis::cmd("ACL").arg(&args).query_async(&mut con).await.unwrap();
    let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "off"]).query_async(&mut con).await.unwrap();
    let addr = ConnectionAddr::Tcp("127.0.0.1".into(), server.port());
    let settings = RedisConnectionInfo::default().set_username(USER).set_password(PASSWORD);
    let info = addr.into_connection_info().unwrap().set_redis_settings(settings);
    redis::Client::open(info).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// `redis://<user>:<password>@127.0.0.1:<port>`, both percent-encoded.
fn encoded_uri(server: &RedisServer, password: &str) -> String {
    let (user, password) =
        (utf8_percent_encode(USER, NON_ALPHANUMERIC), utf8_percent_encode(password, NON_ALPHANUMERIC));
    format!("redis://{user}:{password}@127.0.0.1:{}", server.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_password_works_in_both_modes_from_a_uri_or_apart_and_none_is_printed() {
    let logs = logs();
    let pair = Pair::start();
    let mut source = protect(&pair.source).await;
    protect(&pair.target).await;
    seed_every_type(&mut source).await;
    seed_strings(&mut source, 2_000).await;

    let from_uri =
        |server: &RedisServer| Server::parse(&encoded_uri(server, PASSWORD), TlsSettings::default()).unwrap();
    let apart = |server: &RedisServer| {
        let bare = Server::parse(&format!("redis://127.0.0.1:{}", server.port()), TlsSettings::default()).unwrap();
        bare.with_credentials(Some(credentials(PASSWORD)))
    };
    for mode in [Mode::Sync, Mode::Scan] {
        for (how, source_as, target_as) in [
            ("URI", from_uri(&pair.source), from_uri(&pair.target)),
            ("apart", apart(&pair.source), apart(&pair.target)),
        ] {
            let mut replicator = Replicator::start(&source_as, &target_as, mode, ReplicatorOptions::default(), None)
                .await
                .unwrap_or_else(|err| panic!("{mode:?} with credentials {how}: {err}"));
            let _: () = source.set(format!("written-during-{mode}-{how}"), 1).await.unwrap();
            caught_up(&mut replicator).await;
            replicator.stop().await.unwrap();
            let verifier = Verifier::connect(&source_as, &target_as, VerifyOptions::default()).await.unwrap();
            assert_clean(&verifier.run().await.unwrap());
        }
    }

    // A wrong password: the error names the server, never a password.
    let wrong = "wr0ng p@ss:w/rd ü";
    let good = from_uri(&pair.source);
    let bad_target = Server::parse(&encoded_uri(&pair.target, wrong), TlsSettings::default()).unwrap();
    for mode in [Mode::Sync, Mode::Scan] {
        let err = Replicator::start(&good, &bad_target, mode, ReplicatorOptions::default(), None).await.err().unwrap();
        let message = format!("{err} {err:?}");
        assert!(message.contains(&format!("target 127.0.0.1:{}", pair.target.port())), "{message}");
        assert!(!message.contains("wr0ng") && !message.contains("p@ss"), "{mode:?}: {message}");
    }
    let err = Verifier::connect(&good, &bad_target, VerifyOptions::default()).await.err().unwrap();
    assert!(!format!("{err} {err:?}").contains("wr0ng"), "{err}");

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("127.0.0.1"), "the engine logged: {logs}");
    for secret in [PASSWORD, "p@ss", "wr0ng", "p%40ss"] {
        assert!(!logs.contains(secret), "{secret:?} in the logs");
    }
}
