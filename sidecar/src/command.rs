//! What kind of command a request is, from its name alone.
//!
//! The data plane counts commands by kind now and will route them by kind (reads to a share of
//! the target, writes to the authoritative side). The built-in table covers the core commands;
//! anything it does not know is `Other`, which always goes where writes go, the safe side.

/// The kinds routing cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// Reads a key and changes nothing.
    Read,
    /// Changes data.
    Write,
    /// Everything else: connection state, transactions, pub/sub, scripting, admin.
    Other,
}

impl CommandKind {
    pub const ALL: [CommandKind; 3] = [CommandKind::Read, CommandKind::Write, CommandKind::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Read => "read",
            CommandKind::Write => "write",
            CommandKind::Other => "other",
        }
    }

    /// Classifies a command name, case-insensitively, without allocating.
    pub fn of(name: &[u8]) -> CommandKind {
        let mut upper = [0u8; 24];
        let Some(slot) = upper.get_mut(..name.len()) else { return CommandKind::Other };
        slot.copy_from_slice(name);
        slot.make_ascii_uppercase();
        match &*slot {
            b"GET" | b"MGET" | b"GETRANGE" | b"STRLEN" | b"EXISTS" | b"TTL" | b"PTTL" | b"TYPE" | b"HGET"
            | b"HMGET" | b"HGETALL" | b"HKEYS" | b"HVALS" | b"HLEN" | b"HEXISTS" | b"HSTRLEN" | b"LRANGE"
            | b"LINDEX" | b"LLEN" | b"LPOS" | b"SMEMBERS" | b"SISMEMBER" | b"SMISMEMBER" | b"SCARD"
            | b"SRANDMEMBER" | b"SINTER" | b"SUNION" | b"SDIFF" | b"ZRANGE" | b"ZRANGEBYSCORE" | b"ZREVRANGE"
            | b"ZREVRANGEBYSCORE" | b"ZRANK" | b"ZREVRANK" | b"ZSCORE" | b"ZMSCORE" | b"ZCARD" | b"ZCOUNT"
            | b"XRANGE" | b"XREVRANGE" | b"XLEN" | b"GETBIT" | b"BITCOUNT" | b"BITPOS" | b"PFCOUNT" | b"GEOPOS"
            | b"GEODIST" | b"GEOSEARCH" | b"DUMP" | b"EXPIRETIME" | b"PEXPIRETIME" | b"SCAN" | b"HSCAN" | b"SSCAN"
            | b"ZSCAN" | b"KEYS" | b"RANDOMKEY" | b"DBSIZE" | b"OBJECT" | b"MEMORY" | b"SUBSTR" | b"LCS"
            | b"SINTERCARD" | b"ZINTERCARD" | b"GETEX_RO" => CommandKind::Read,
            b"SET" | b"SETNX" | b"SETEX" | b"PSETEX" | b"MSET" | b"MSETNX" | b"GETSET" | b"GETDEL" | b"GETEX"
            | b"APPEND" | b"SETRANGE" | b"INCR" | b"INCRBY" | b"INCRBYFLOAT" | b"DECR" | b"DECRBY" | b"DEL"
            | b"UNLINK" | b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"PEXPIREAT" | b"PERSIST" | b"RENAME"
            | b"RENAMENX" | b"COPY" | b"RESTORE" | b"MOVE" | b"HSET" | b"HSETNX" | b"HMSET" | b"HDEL" | b"HINCRBY"
            | b"HINCRBYFLOAT" | b"LPUSH" | b"RPUSH" | b"LPUSHX" | b"RPUSHX" | b"LPOP" | b"RPOP" | b"LSET" | b"LREM"
            | b"LTRIM" | b"LINSERT" | b"LMOVE" | b"RPOPLPUSH" | b"LMPOP" | b"SADD" | b"SREM" | b"SPOP" | b"SMOVE"
            | b"SINTERSTORE" | b"SUNIONSTORE" | b"SDIFFSTORE" | b"ZADD" | b"ZINCRBY" | b"ZREM" | b"ZPOPMIN"
            | b"ZPOPMAX" | b"ZMPOP" | b"ZREMRANGEBYSCORE" | b"ZREMRANGEBYRANK" | b"ZREMRANGEBYLEX" | b"ZRANGESTORE"
            | b"ZUNIONSTORE" | b"ZINTERSTORE" | b"ZDIFFSTORE" | b"XADD" | b"XDEL" | b"XTRIM" | b"XGROUP" | b"XACK"
            | b"XCLAIM" | b"XAUTOCLAIM" | b"XSETID" | b"SETBIT" | b"BITOP" | b"BITFIELD" | b"PFADD" | b"PFMERGE"
            | b"GEOADD" | b"GEOSEARCHSTORE" | b"FLUSHDB" | b"FLUSHALL" | b"SWAPDB" => CommandKind::Write,
            _ => CommandKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify_case_insensitively() {
        assert_eq!(CommandKind::of(b"get"), CommandKind::Read);
        assert_eq!(CommandKind::of(b"HgetAll"), CommandKind::Read);
        assert_eq!(CommandKind::of(b"INCR"), CommandKind::Write);
        assert_eq!(CommandKind::of(b"lpush"), CommandKind::Write);
        assert_eq!(CommandKind::of(b"MULTI"), CommandKind::Other);
        assert_eq!(CommandKind::of(b"SUBSCRIBE"), CommandKind::Other);
        assert_eq!(CommandKind::of(b""), CommandKind::Other);
        assert_eq!(CommandKind::of(&[b'X'; 100]), CommandKind::Other, "longer than any command");
    }
}
