//! Writers that prove a migration exact: clients that write numbered values through a sidecar,
//! record what each write was told, and read their own writes back; and the check, on the
//! server that is authoritative at the end, that every write a client saw acknowledged is there
//! exactly once and in order. The fault suite runs them in its own process against
//! `eden-sidecar` processes; the node's tests run them inside application pods (`eden-writer`),
//! which print what they were told.

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How a writer reaches its sidecar (or a gateway): `host:port`. A client whose connection may
/// drop (its sidecar restarted, or a server the sidecar relays for gone) treats a dropped
/// connection as the end of that connection, not a failure: what it had sent is ambiguous
/// (applied or not, it cannot know), and it connects again.
#[derive(Clone, Debug)]
pub struct Client {
    pub address: String,
    pub drops: bool,
}

impl Client {
    /// A connection, once the sidecar serves (after it applied a strategy); panics after 30 s.
    pub async fn connect(&self) -> MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        let client = redis::Client::open(format!("redis://{}", self.address)).expect("a valid address");
        for _ in 0..300 {
            if let Ok(connection) = client.get_multiplexed_async_connection_with_config(&config).await {
                return connection;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} never served", self.address);
    }

    /// Whether `err` ends the connection rather than fails the writer.
    pub fn dropped(&self, err: &redis::RedisError) -> bool {
        self.drops && (err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error())
    }
}

/// What one writer's clients were told.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Acknowledged {
    /// INCRs answered with a count.
    pub incr: i64,
    /// RPUSHed values, each answered with a length.
    pub pushed: Vec<i64>,
    /// Writes answered with an error (refused by a fenced sidecar, or its server unreachable).
    pub refused: u64,
    /// The longest one round of writes (INCR, RPUSH, SET) waited for its replies.
    pub longest: Duration,
    /// Reads of `last:<name>` that returned a value older than this client's last acknowledged
    /// `SET` of it.
    pub stale_reads: u64,
    /// Reads of it, in all.
    pub reads: u64,
    /// Reads answered with the sidecar's error (their server unreachable), by either client.
    pub refused_reads: u64,
    /// The longest a read took, for a client of the same sidecar that only reads.
    pub longest_read: Duration,
    /// INCRs and RPUSHed values sent on a connection that dropped before their reply.
    pub ambiguous_incr: i64,
    pub ambiguous_pushed: Vec<i64>,
    /// Connections the writer had to open again.
    pub reconnects: u32,
}

impl Acknowledged {
    /// Checks, on `server` (the side authoritative now), that this writer's reads never went
    /// back in time and that every write it saw acknowledged is there exactly once (counters)
    /// and in order (sequences); an ambiguous one at most once. Panics with what differs.
    pub async fn assert_exact_on(&self, name: &str, server: &mut MultiplexedConnection) {
        eprintln!(
            "{name}: {} INCRs and {} RPUSHes acknowledged, {} refused, {} ambiguous, {} reconnects, longest wait \
             {:?}, longest read {:?}, {} of {} reads stale, {} reads refused",
            self.incr,
            self.pushed.len(),
            self.refused,
            self.ambiguous_incr,
            self.reconnects,
            self.longest,
            self.longest_read,
            self.stale_reads,
            self.reads,
            self.refused_reads
        );
        assert_eq!(self.stale_reads, 0, "{name}: a read went back in time for its client");
        let counter: i64 = server.get::<_, Option<i64>>(format!("counter:{name}")).await.unwrap().unwrap_or(0);
        assert!(
            (self.incr..=self.incr + self.ambiguous_incr).contains(&counter),
            "{name}: {counter} INCRs applied, {} acknowledged, {} ambiguous",
            self.incr,
            self.ambiguous_incr
        );
        let sequence: Vec<i64> = server.lrange(format!("seq:{name}"), 0, -1).await.unwrap();
        let (applied, extra): (Vec<i64>, Vec<i64>) =
            sequence.iter().partition(|n| self.pushed.binary_search(n).is_ok());
        assert_eq!(applied, self.pushed, "{name}: RPUSHes acknowledged vs stored, in order");
        assert!(
            extra.iter().all(|n| self.ambiguous_pushed.contains(n)) && extra.windows(2).all(|pair| pair[0] < pair[1]),
            "{name}: stored values never acknowledged nor ambiguous, or twice: {extra:?}"
        );
    }
}

/// The reads a sidecar has sent to the target so far, from its admin port's `/metrics` (a
/// short blocking request).
pub fn target_reads(admin: impl std::net::ToSocketAddrs) -> u64 {
    use std::io::{Read, Write};
    let mut connection = std::net::TcpStream::connect(admin).expect("the sidecar's admin port answers");
    connection.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    connection.read_to_string(&mut page).unwrap();
    let series = "eden_commands_total{route=\"target\",kind=\"read\"} ";
    page.lines().find_map(|line| line.strip_prefix(series)).map_or(0, |n| n.parse().unwrap())
}

/// A writer and a reader of the same sidecar until `stop`: [`write_until`] with the reader's
/// longest read and refused reads (its reads, of a key it never writes, may be served by the
/// target).
pub async fn write_and_read_until(client: Client, name: &str, stop: watch::Receiver<bool>) -> Acknowledged {
    let reader = tokio::spawn(read_until(client.clone(), name.to_string(), stop.clone()));
    let mut acknowledged = write_until(client, name, stop).await;
    let (longest_read, refused_reads) = reader.await.expect("the reader does not panic");
    acknowledged.longest_read = longest_read;
    acknowledged.refused_reads += refused_reads;
    acknowledged
}

/// Reads `last:<name>` through the sidecar until `stop`; returns the longest a read took and
/// how many the sidecar refused.
async fn read_until(client: Client, name: String, mut stop: watch::Receiver<bool>) -> (Duration, u64) {
    let (mut longest, mut refused, mut sidecar) = (Duration::ZERO, 0, client.connect().await);
    while !*stop.borrow_and_update() {
        let started = Instant::now();
        let read: redis::RedisResult<Option<i64>> = sidecar.get(format!("last:{name}")).await;
        match read {
            Ok(_) => longest = longest.max(started.elapsed()),
            Err(err) if client.dropped(&err) => sidecar = client.connect().await,
            Err(err) => {
                assert_refusal(&name, &err);
                refused += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (longest, refused)
}

/// Fails the writer unless `err` is the sidecar's own answer (`-ERR eden: …`): a write a fenced
/// sidecar refuses, or a request whose server it cannot reach.
fn assert_refusal(name: &str, err: &redis::RedisError) {
    assert!(!err.is_io_error() && !err.is_timeout(), "{name}: the sidecar failed the client: {err}");
    assert!(err.to_string().contains("eden:"), "{name}: an error that is not a refusal: {err}");
}

/// Writes `INCR counter:<name>`, `RPUSH seq:<name> n` and `SET last:<name> n` through the
/// sidecar until `stop`, recording every acknowledgement, and reads `last:<name>` back after
/// each, counting reads that went back in time.
async fn write_until(client: Client, name: &str, mut stop: watch::Receiver<bool>) -> Acknowledged {
    let (mut acknowledged, mut last) = (Acknowledged::default(), None);
    let mut sidecar = client.connect().await;
    for n in 0.. {
        if *stop.borrow_and_update() {
            break;
        }
        let started = Instant::now();
        let incr: redis::RedisResult<i64> = sidecar.incr(format!("counter:{name}"), 1).await;
        let push: redis::RedisResult<i64> = sidecar.rpush(format!("seq:{name}"), n).await;
        let set: redis::RedisResult<()> = sidecar.set(format!("last:{name}"), n).await;
        acknowledged.longest = acknowledged.longest.max(started.elapsed());
        let mut dropped = false;
        for outcome in [incr.as_ref().map(|_| ()), push.as_ref().map(|_| ()), set.as_ref().map(|_| ())] {
            match outcome {
                Err(err) if client.dropped(err) => dropped = true,
                Err(err) => {
                    assert_refusal(name, err);
                    acknowledged.refused += 1;
                }
                Ok(()) => {}
            }
        }
        match &incr {
            Ok(_) => acknowledged.incr += 1,
            Err(err) if client.dropped(err) => acknowledged.ambiguous_incr += 1,
            Err(_) => {}
        }
        match &push {
            Ok(_) => acknowledged.pushed.push(n),
            Err(err) if client.dropped(err) => acknowledged.ambiguous_pushed.push(n),
            Err(_) => {}
        }
        if set.is_ok() {
            last = Some(n);
        }
        if !dropped {
            match sidecar.get::<_, Option<i64>>(format!("last:{name}")).await {
                Ok(read) => {
                    acknowledged.reads += 1;
                    acknowledged.stale_reads += u64::from(read < last);
                }
                Err(err) if client.dropped(&err) => dropped = true,
                Err(err) => {
                    assert_refusal(name, &err);
                    acknowledged.refused_reads += 1;
                }
            }
        }
        if !dropped {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        // What the dropped connection had sent may or may not have been applied; whether
        // `last` moved is unknown too, so reads are judged from the next SET on.
        last = None;
        acknowledged.reconnects += 1;
        sidecar = client.connect().await;
    }
    acknowledged
}
