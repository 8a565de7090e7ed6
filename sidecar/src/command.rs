//! What a request is: its kind (what routing and metrics care about) and its first key.
//!
//! Both are found inside the client's bytes without allocating: the name is upper-cased into a
//! stack buffer and looked up in a built-in table, and the key is a range into the request.
//! The table has the shape of what `COMMAND INFO` reports (flags give the kind; a first-key
//! position, or "movable keys" for the few commands that say where their keys are). Names the
//! built-in table does not know (module commands, commands newer than this build) are looked
//! up in what the upstream itself reported at start ([`learn`]); a name neither knows is
//! [`CommandKind::Other`], which routing sends where writes go: the safe side.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

use crate::frame::Request;

/// The kinds routing cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// Reads keys and changes nothing.
    Read,
    /// Changes data (scripts and functions included: they may).
    Write,
    /// Holds the connection until data arrives or a timeout (BLPOP, XREAD BLOCK, WAIT).
    Blocking,
    /// MULTI/EXEC/DISCARD/WATCH/UNWATCH: must stay on one connection, in order.
    Transaction,
    /// Turns the connection into a subscriber, or publishes.
    PubSub,
    /// Per-connection state: AUTH, SELECT, HELLO, PING, RESET, QUIT…
    Connection,
    /// Server administration and inspection: CONFIG, INFO, CLIENT, OBJECT, MEMORY, FUNCTION,
    /// SCRIPT, ACL, replication…
    Admin,
    /// Not in the table (module commands, newer commands).
    Other,
}

impl CommandKind {
    pub const ALL: [CommandKind; 8] = [
        CommandKind::Read,
        CommandKind::Write,
        CommandKind::Blocking,
        CommandKind::Transaction,
        CommandKind::PubSub,
        CommandKind::Connection,
        CommandKind::Admin,
        CommandKind::Other,
    ];

    /// The `kind` label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Read => "read",
            CommandKind::Write => "write",
            CommandKind::Blocking => "blocking",
            CommandKind::Transaction => "transaction",
            CommandKind::PubSub => "pubsub",
            CommandKind::Connection => "connection",
            CommandKind::Admin => "admin",
            CommandKind::Other => "other",
        }
    }

    /// Classifies a command name, case-insensitively, without allocating.
    pub fn of(name: &[u8]) -> CommandKind {
        spec(name).0
    }
}

/// A session's memory of the last command name it classified: a pipeline mostly repeats a
/// few commands, and comparing a few bytes is cheaper than upper-casing and looking the name
/// up again. Names are compared as sent, so `get` after `GET` is looked up once more.
#[derive(Debug, Clone)]
pub struct RecentCommand {
    name: [u8; RecentCommand::LONGEST],
    /// Length of `name`; `usize::MAX` while nothing is remembered.
    len: usize,
    spec: (CommandKind, FirstKey),
}

impl Default for RecentCommand {
    fn default() -> Self {
        RecentCommand { name: [0; RecentCommand::LONGEST], len: usize::MAX, spec: (CommandKind::Other, FirstKey::None) }
    }
}

impl RecentCommand {
    /// Longer names are classified every time.
    const LONGEST: usize = 16;

    /// The complete `request` at the front of `buf`, classified as [`Command::of`] does.
    pub fn command(&mut self, buf: &[u8], request: &Request) -> Command {
        let spec = self.spec(&buf[request.name.clone()]);
        Command::with_spec(buf, request, spec)
    }

    /// The kind alone, without looking for the key: only XREAD and XREADGROUP need their
    /// arguments read for it (BLOCK makes them blocking).
    pub fn kind(&mut self, buf: &[u8], request: &Request) -> CommandKind {
        match self.spec(&buf[request.name.clone()]) {
            spec @ (_, FirstKey::AfterStreams) => Command::with_spec(buf, request, spec).kind,
            (kind, _) => kind,
        }
    }

    fn spec(&mut self, name: &[u8]) -> (CommandKind, FirstKey) {
        if self.len == name.len() && self.name[..name.len()] == *name {
            return self.spec;
        }
        let spec = spec(name);
        // Until the upstream's table is learned, a name unknown here may still gain a kind.
        let settled = spec.0 != CommandKind::Other || LEARNED.get().is_some();
        if settled && let Some(slot) = self.name.get_mut(..name.len()) {
            slot.copy_from_slice(name);
            (self.len, self.spec) = (name.len(), spec);
        }
        spec
    }
}

/// One entry of the upstream's `COMMAND` reply: what classification needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandInfo {
    pub name: String,
    pub flags: Vec<String>,
    /// Position of the first key; 0 for keyless commands and for movable keys.
    pub first_key: i64,
}

impl CommandInfo {
    fn classify(&self) -> (CommandKind, FirstKey) {
        let has = |flag: &str| self.flags.iter().any(|f| f.eq_ignore_ascii_case(flag));
        let kind = if has("pubsub") {
            CommandKind::PubSub
        } else if has("blocking") {
            CommandKind::Blocking
        } else if has("write") {
            CommandKind::Write
        } else if has("readonly") {
            CommandKind::Read
        } else if has("admin") {
            CommandKind::Admin
        } else {
            CommandKind::Other
        };
        let first_key = match usize::try_from(self.first_key) {
            Ok(position) if position > 0 && !has("movablekeys") => FirstKey::At(position),
            _ => FirstKey::None,
        };
        (kind, first_key)
    }
}

/// Commands learned from the upstream, by upper-case name. Written once: the command table of
/// a server does not change while it runs, and a lookup must not take a lock.
static LEARNED: OnceLock<CommandTable> = OnceLock::new();

/// Kind and first-key position by upper-case command name.
type CommandTable = HashMap<Box<[u8]>, (CommandKind, FirstKey)>;

/// Adds what the upstream reported for the names the built-in table does not know; the
/// built-in entries stay authoritative (they carry special cases `COMMAND` cannot express,
/// such as XREAD's BLOCK). Returns how many commands were learned; the first call wins.
pub fn learn(commands: impl IntoIterator<Item = CommandInfo>) -> usize {
    let learned: CommandTable = commands
        .into_iter()
        .map(|info| (info.name.to_ascii_uppercase().into_bytes().into_boxed_slice(), info.classify()))
        .filter(|(name, _)| builtin(name).is_none())
        .collect();
    let count = learned.len();
    if LEARNED.set(learned).is_err() {
        return 0;
    }
    count
}

/// Where a command's first key is. Argument indexes count the name as 0, as `COMMAND INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstKey {
    None,
    At(usize),
    /// Argument `n` says how many keys follow it (EVAL, FCALL, LMPOP…).
    AfterNumkeys(usize),
    /// Keys follow a `STREAMS` token (XREAD, XREADGROUP).
    AfterStreams,
}

/// A classified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub kind: CommandKind,
    /// The first key, as a range into the request's bytes; `None` for keyless commands.
    pub key: Option<Range<usize>>,
}

impl Command {
    /// Classifies the complete `request` at the front of `buf`. Walks the arguments only as
    /// far as the first key.
    pub fn of(buf: &[u8], request: &Request) -> Command {
        Command::with_spec(buf, request, spec(&buf[request.name.clone()]))
    }

    /// [`Command::of`], with the name already looked up.
    fn with_spec(buf: &[u8], request: &Request, (mut kind, first_key): (CommandKind, FirstKey)) -> Command {
        let mut args = request.args(buf);
        let key = match first_key {
            FirstKey::None => None,
            FirstKey::At(index) => args.nth(index),
            FirstKey::AfterNumkeys(index) => {
                let numkeys = args.nth(index).and_then(|count| parse_count(&buf[count]));
                numkeys.filter(|&n| n > 0).and_then(|_| args.next())
            }
            FirstKey::AfterStreams => {
                let mut key = None;
                while let Some(arg) = args.next() {
                    let arg = &buf[arg];
                    if arg.eq_ignore_ascii_case(b"BLOCK") {
                        kind = CommandKind::Blocking;
                    } else if arg.eq_ignore_ascii_case(b"STREAMS") {
                        key = args.next();
                        break;
                    }
                }
                key
            }
        };
        Command { kind, key }
    }
}

fn parse_count(digits: &[u8]) -> Option<usize> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Kind and first-key position by name: the built-in table, then what the upstream reported.
fn spec(name: &[u8]) -> (CommandKind, FirstKey) {
    // Longer than any command name Redis or its common modules define.
    let mut upper = [0u8; 64];
    let Some(slot) = upper.get_mut(..name.len()) else { return (CommandKind::Other, FirstKey::None) };
    slot.copy_from_slice(name);
    slot.make_ascii_uppercase();
    builtin(slot).or_else(|| LEARNED.get()?.get(&*slot).copied()).unwrap_or((CommandKind::Other, FirstKey::None))
}

/// The built-in table, for an upper-case `name`.
fn builtin(name: &[u8]) -> Option<(CommandKind, FirstKey)> {
    use CommandKind::*;
    use FirstKey::*;

    Some(match name {
        b"SCAN" | b"KEYS" | b"RANDOMKEY" | b"DBSIZE" => (Read, None),
        b"FLUSHDB" | b"FLUSHALL" | b"SWAPDB" => (Write, None),
        b"XINFO" => (Read, At(2)),
        // How the server that owns the key stores it: admin, routed to the key's owner.
        b"OBJECT" | b"MEMORY" => (Admin, At(2)),
        b"BITOP" | b"XGROUP" => (Write, At(2)),
        b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL_RO" => (Read, AfterNumkeys(2)),
        b"EVAL" | b"EVALSHA" | b"FCALL" => (Write, AfterNumkeys(2)),
        b"SINTERCARD" | b"ZINTERCARD" | b"ZUNION" | b"ZINTER" | b"ZDIFF" => (Read, AfterNumkeys(1)),
        b"LMPOP" | b"ZMPOP" => (Write, AfterNumkeys(1)),
        b"BLMPOP" | b"BZMPOP" => (Blocking, AfterNumkeys(2)),
        b"XREAD" => (Read, AfterStreams),
        b"XREADGROUP" => (Write, AfterStreams),
        b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BZPOPMIN" | b"BZPOPMAX" => (Blocking, At(1)),
        b"WAIT" | b"WAITAOF" => (Blocking, None),
        b"WATCH" => (Transaction, At(1)),
        b"MULTI" | b"EXEC" | b"DISCARD" | b"UNWATCH" => (Transaction, None),
        // Shard channels hash to slots like keys, which a cluster upstream will need.
        b"SSUBSCRIBE" | b"SUNSUBSCRIBE" | b"SPUBLISH" => (PubSub, At(1)),
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" | b"PUBLISH" | b"PUBSUB" => (PubSub, None),
        b"AUTH" | b"SELECT" | b"HELLO" | b"PING" | b"ECHO" | b"QUIT" | b"RESET" | b"READONLY" | b"READWRITE" => {
            (Connection, None)
        }
        b"CONFIG" | b"INFO" | b"DEBUG" | b"SHUTDOWN" | b"SAVE" | b"BGSAVE" | b"BGREWRITEAOF" | b"LASTSAVE"
        | b"SLOWLOG" | b"LATENCY" | b"MONITOR" | b"REPLICAOF" | b"SLAVEOF" | b"ACL" | b"COMMAND" | b"CLUSTER"
        | b"FUNCTION" | b"SCRIPT" | b"TIME" | b"ROLE" | b"MODULE" | b"FAILOVER" | b"SYNC" | b"PSYNC" | b"REPLCONF"
        | b"MIGRATE" | b"CLIENT" => (Admin, None),
        b"GET"
        | b"MGET"
        | b"GETRANGE"
        | b"STRLEN"
        | b"EXISTS"
        | b"TTL"
        | b"PTTL"
        | b"TYPE"
        | b"HGET"
        | b"HMGET"
        | b"HGETALL"
        | b"HKEYS"
        | b"HVALS"
        | b"HLEN"
        | b"HEXISTS"
        | b"HSTRLEN"
        | b"HRANDFIELD"
        | b"LRANGE"
        | b"LINDEX"
        | b"LLEN"
        | b"LPOS"
        | b"SMEMBERS"
        | b"SISMEMBER"
        | b"SMISMEMBER"
        | b"SCARD"
        | b"SRANDMEMBER"
        | b"SINTER"
        | b"SUNION"
        | b"SDIFF"
        | b"ZRANGE"
        | b"ZRANGEBYSCORE"
        | b"ZRANGEBYLEX"
        | b"ZREVRANGE"
        | b"ZREVRANGEBYSCORE"
        | b"ZREVRANGEBYLEX"
        | b"ZRANK"
        | b"ZREVRANK"
        | b"ZSCORE"
        | b"ZMSCORE"
        | b"ZCARD"
        | b"ZCOUNT"
        | b"ZLEXCOUNT"
        | b"ZRANDMEMBER"
        | b"XRANGE"
        | b"XREVRANGE"
        | b"XLEN"
        | b"XPENDING"
        | b"GETBIT"
        | b"BITCOUNT"
        | b"BITPOS"
        | b"BITFIELD_RO"
        | b"PFCOUNT"
        | b"GEOPOS"
        | b"GEODIST"
        | b"GEOHASH"
        | b"GEOSEARCH"
        | b"GEORADIUS_RO"
        | b"GEORADIUSBYMEMBER_RO"
        | b"DUMP"
        | b"EXPIRETIME"
        | b"PEXPIRETIME"
        | b"HSCAN"
        | b"SSCAN"
        | b"ZSCAN"
        | b"SUBSTR"
        | b"LCS"
        | b"SORT_RO"
        | b"TOUCH" => (Read, At(1)),
        b"SET" | b"SETNX" | b"SETEX" | b"PSETEX" | b"MSET" | b"MSETNX" | b"GETSET" | b"GETDEL" | b"GETEX"
        | b"APPEND" | b"SETRANGE" | b"INCR" | b"INCRBY" | b"INCRBYFLOAT" | b"DECR" | b"DECRBY" | b"DEL" | b"UNLINK"
        | b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"PEXPIREAT" | b"PERSIST" | b"RENAME" | b"RENAMENX" | b"COPY"
        | b"RESTORE" | b"MOVE" | b"SORT" | b"HSET" | b"HSETNX" | b"HMSET" | b"HDEL" | b"HINCRBY" | b"HINCRBYFLOAT"
        | b"LPUSH" | b"RPUSH" | b"LPUSHX" | b"RPUSHX" | b"LPOP" | b"RPOP" | b"LSET" | b"LREM" | b"LTRIM"
        | b"LINSERT" | b"LMOVE" | b"RPOPLPUSH" | b"SADD" | b"SREM" | b"SPOP" | b"SMOVE" | b"SINTERSTORE"
        | b"SUNIONSTORE" | b"SDIFFSTORE" | b"ZADD" | b"ZINCRBY" | b"ZREM" | b"ZPOPMIN" | b"ZPOPMAX"
        | b"ZREMRANGEBYSCORE" | b"ZREMRANGEBYRANK" | b"ZREMRANGEBYLEX" | b"ZRANGESTORE" | b"ZUNIONSTORE"
        | b"ZINTERSTORE" | b"ZDIFFSTORE" | b"XADD" | b"XDEL" | b"XTRIM" | b"XACK" | b"XCLAIM" | b"XAUTOCLAIM"
        | b"XSETID" | b"SETBIT" | b"BITFIELD" | b"PFADD" | b"PFMERGE" | b"GEOADD" | b"GEOSEARCHSTORE"
        | b"GEORADIUS" | b"GEORADIUSBYMEMBER" => (Write, At(1)),
        _ => return Option::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::RequestScanner;

    #[test]
    fn server_flags_give_the_kind_and_the_first_key() {
        let info = |name: &str, flags: &[&str], first_key| CommandInfo {
            name: name.into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            first_key,
        };
        assert_eq!(info("JSON.SET", &["write", "denyoom"], 1).classify(), (CommandKind::Write, FirstKey::At(1)));
        assert_eq!(info("JSON.GET", &["readonly"], 1).classify(), (CommandKind::Read, FirstKey::At(1)));
        assert_eq!(info("BF.WAIT", &["blocking", "write"], 1).classify().0, CommandKind::Blocking);
        assert_eq!(info("FT.SEARCH", &["readonly", "movablekeys"], 0).classify(), (CommandKind::Read, FirstKey::None));
        assert_eq!(info("MODULE.HELLO", &["fast"], 0).classify(), (CommandKind::Other, FirstKey::None));
    }

    /// Classifies one request given as its arguments, or as an inline line.
    fn classify(args: &[&str]) -> (CommandKind, Option<String>) {
        let mut bytes = format!("*{}\r\n", args.len());
        for arg in args {
            bytes.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        classify_bytes(bytes.as_bytes())
    }

    fn classify_bytes(bytes: &[u8]) -> (CommandKind, Option<String>) {
        let request = RequestScanner::default().scan(bytes).unwrap().expect("a complete request");
        let command = Command::of(bytes, &request);
        let mut recent = RecentCommand::default();
        assert_eq!(recent.kind(bytes, &request), command.kind, "the kind alone agrees");
        assert_eq!(recent.kind(bytes, &request), command.kind, "and agrees when remembered");
        assert_eq!(recent.command(bytes, &request), command, "so does the whole command");
        (command.kind, command.key.map(|key| String::from_utf8_lossy(&bytes[key]).into_owned()))
    }

    #[test]
    fn names_classify_case_insensitively() {
        use CommandKind::*;
        for (name, kind) in [
            ("get", Read),
            ("HgetAll", Read),
            ("INCR", Write),
            ("lpush", Write),
            ("eval", Write),
            ("blpop", Blocking),
            ("MULTI", Transaction),
            ("SUBSCRIBE", PubSub),
            ("hello", Connection),
            ("config", Admin),
            ("", Other),
            ("MODULE.CMD", Other),
        ] {
            assert_eq!(CommandKind::of(name.as_bytes()), kind, "{name}");
        }
        assert_eq!(CommandKind::of(&[b'X'; 100]), Other, "longer than any command");
    }

    #[test]
    fn the_first_key_is_found_where_each_command_keeps_it() {
        use CommandKind::*;
        let key = |k: &str| Some(k.to_string());
        assert_eq!(classify(&["SET", "user:1", "v"]), (Write, key("user:1")));
        assert_eq!(classify(&["mget", "a", "b"]), (Read, key("a")));
        assert_eq!(classify(&["BITOP", "AND", "dest", "src"]), (Write, key("dest")));
        assert_eq!(classify(&["OBJECT", "ENCODING", "k"]), (Admin, key("k")));
        assert_eq!(classify(&["MEMORY", "USAGE", "k"]), (Admin, key("k")));
        assert_eq!(classify(&["CLIENT", "LIST"]), (Admin, None));
        assert_eq!(classify(&["EVAL", "return 1", "2", "k1", "k2"]), (Write, key("k1")));
        assert_eq!(classify(&["EVAL", "return 1", "0", "arg"]), (Write, None), "numkeys 0: no key");
        assert_eq!(classify(&["FCALL_RO", "f", "1", "k"]), (Read, key("k")));
        assert_eq!(classify(&["LMPOP", "2", "l1", "l2", "LEFT"]), (Write, key("l1")));
        assert_eq!(classify(&["BLMPOP", "0.5", "1", "l", "LEFT"]), (Blocking, key("l")));
        assert_eq!(classify(&["XREAD", "COUNT", "2", "STREAMS", "s1", "s2", "0", "0"]), (Read, key("s1")));
        assert_eq!(classify(&["xread", "block", "0", "streams", "s", "$"]), (Blocking, key("s")), "BLOCK option");
        assert_eq!(classify(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"]), (Write, key("s")));
        assert_eq!(classify(&["SPUBLISH", "orders", "m"]), (PubSub, key("orders")));
        assert_eq!(classify(&["PUBLISH", "news", "m"]), (PubSub, None));
        assert_eq!(classify(&["GET"]), (Read, None), "missing key: Redis will answer the arity error");
        assert_eq!(classify(&["SCAN", "0"]), (Read, None));
        assert_eq!(classify_bytes(b"get  inline:key\r\n"), (Read, key("inline:key")));
    }
}
