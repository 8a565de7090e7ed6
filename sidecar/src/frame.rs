//! Request boundaries in the client's bytes.
//!
//! The proxy forwards the client's own bytes untouched; all it needs from a request is where
//! it ends and, for routing, its arguments as ranges into the buffer. Requests are only ever
//! arrays of bulk strings (`*N\r\n$len\r\n…`) or inline lines (`PING\r\n`), so this is a small
//! scanner rather than a general RESP decoder: `redis_protocol::resp2::decode::decode_range`
//! builds a `Vec<RangeFrame>` per request, accepts any frame type inside an array, knows no
//! inline commands, and starts over on every read of a partly received frame, which turns one
//! large request arriving over many reads into quadratic work. [`RequestScanner`] keeps its
//! place across reads and allocates nothing; [`Request::args`] walks a complete request's
//! headers again when someone needs more than the name.
//!
//! Limits and error texts follow redis-server (`processMultibulkBuffer`, `string2ll`), so a
//! client sees the same protocol errors it would see without Eden.

use std::ops::Range;

/// Largest bulk string, as Redis's default `proto-max-bulk-len`.
pub const MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Largest array, as Redis 7 (`INT_MAX` elements).
pub const MAX_MULTIBULK_LEN: usize = i32::MAX as usize;
/// Longest inline request, as Redis's `PROTO_INLINE_MAX_SIZE`.
pub const MAX_INLINE_LEN: usize = 64 * 1024;
/// No valid `*<count>` or `$<len>` line is longer than this; a longer one is garbage, and
/// saying so early keeps a junk header from being buffered up to [`MAX_INLINE_LEN`].
const MAX_HEADER_LEN: usize = 32;

/// A complete request at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes the request occupies, from the start of the buffer.
    pub len: usize,
    /// The command name; empty for an empty request (`*0`, a blank inline line).
    pub name: Range<usize>,
    /// Arguments including the name.
    pub argc: usize,
}

impl Request {
    /// The ranges of every argument, name first, in `buf` (which starts with this request).
    /// Inline requests are split on whitespace; quotes are left to Redis, which interprets them.
    pub fn args<'a>(&self, buf: &'a [u8]) -> Args<'a> {
        let buf = &buf[..self.len.min(buf.len())];
        let inline = buf.first() != Some(&b'*');
        let pos =
            if inline { 0 } else { buf.iter().position(|&b| b == b'\n').map_or(buf.len(), |newline| newline + 1) };
        Args { buf, pos, inline }
    }
}

/// Iterator over a complete request's argument ranges; see [`Request::args`].
#[derive(Debug, Clone)]
pub struct Args<'a> {
    buf: &'a [u8],
    pos: usize,
    inline: bool,
}

impl Iterator for Args<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let rest = self.buf.get(self.pos..)?;
        let (start, end) = if self.inline {
            let start = self.pos + rest.iter().position(|b| !b.is_ascii_whitespace())?;
            let word = self.buf[start..].iter().position(u8::is_ascii_whitespace);
            (start, word.map_or(self.buf.len(), |len| start + len))
        } else {
            // The scanner validated the request; anything odd here just ends the walk.
            let (len, start) = read_number(self.buf, self.pos + 1, ProtocolError::InvalidBulkLength).ok()??;
            let end = start.checked_add(usize::try_from(len).ok()?).filter(|&end| end <= self.buf.len())?;
            (start, end)
        };
        self.pos = end + usize::from(!self.inline) * 2;
        Some(start..end)
    }
}

/// Malformed input: the connection is answered with this error and closed, as Redis does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// An array element that is not a bulk string; carries the byte found instead.
    #[error("Protocol error: expected '$', got '{}'", std::ascii::escape_default(*.0))]
    ExpectedBulk(u8),
    #[error("Protocol error: too big inline request")]
    InlineTooBig,
}

impl ProtocolError {
    /// The reply the client gets.
    pub fn to_resp(&self) -> String {
        format!("-ERR {self}\r\n")
    }
}

/// Finds request boundaries, resuming where the last call stopped inside a partial request.
#[derive(Debug, Default)]
pub struct RequestScanner {
    partial: Option<Partial>,
}

#[derive(Debug, Clone)]
struct Partial {
    /// Where scanning resumes.
    pos: usize,
    /// Array elements still to read.
    remaining: usize,
    argc: usize,
    name: Range<usize>,
}

impl RequestScanner {
    /// The request at the front of `buf`, `None` if it is not complete yet. `buf` must start
    /// where the previous complete request ended and only grow between calls that return `None`.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
        if self.partial.is_none()
            && let Some(request) = scan_whole(buf)
        {
            return Ok(Some(request));
        }
        self.scan_resumable(buf)
    }

    fn scan_resumable(&mut self, buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
        let mut state = match self.partial.take() {
            Some(state) => state,
            None => match buf.first() {
                None => return Ok(None),
                Some(b'*') => {
                    let Some((count, pos)) = read_number(buf, 1, ProtocolError::InvalidMultibulkLength)? else {
                        return self.too_long_header(buf);
                    };
                    // Like Redis, an empty or negative count is a request that does nothing.
                    if count <= 0 {
                        return Ok(Some(Request { len: pos, name: 0..0, argc: 0 }));
                    }
                    if count as usize > MAX_MULTIBULK_LEN {
                        return Err(ProtocolError::InvalidMultibulkLength);
                    }
                    Partial { pos, remaining: count as usize, argc: count as usize, name: 0..0 }
                }
                Some(_) => return scan_inline(buf),
            },
        };
        while state.remaining > 0 {
            let Some(&marker) = buf.get(state.pos) else { return self.suspend(state) };
            if marker != b'$' {
                return Err(ProtocolError::ExpectedBulk(marker));
            }
            let Some((len, start)) = read_number(buf, state.pos + 1, ProtocolError::InvalidBulkLength)? else {
                if buf.len() - state.pos > MAX_HEADER_LEN {
                    return Err(ProtocolError::InvalidBulkLength);
                }
                return self.suspend(state);
            };
            if len < 0 || len as usize > MAX_BULK_LEN {
                return Err(ProtocolError::InvalidBulkLength);
            }
            let end = start + len as usize;
            // Redis skips the two bytes after the data without looking at them; so do we, so
            // that both always agree where a request ends.
            if buf.len() < end + 2 {
                return self.suspend(state);
            }
            if state.remaining == state.argc {
                state.name = start..end;
            }
            state.pos = end + 2;
            state.remaining -= 1;
        }
        Ok(Some(Request { len: state.pos, name: state.name, argc: state.argc }))
    }

    fn suspend(&mut self, state: Partial) -> Result<Option<Request>, ProtocolError> {
        self.partial = Some(state);
        Ok(None)
    }

    fn too_long_header(&self, buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
        if buf.len() > MAX_HEADER_LEN { Err(ProtocolError::InvalidMultibulkLength) } else { Ok(None) }
    }
}

/// The common case in one pass and no state: a whole request of bulk strings, every header one
/// or two digits. `None` for anything else, which [`RequestScanner`] then scans in full (and
/// finds the same request, if it is one).
#[inline(always)]
fn scan_whole(buf: &[u8]) -> Option<Request> {
    if buf.first() != Some(&b'*') {
        return None;
    }
    let (argc, mut pos) = short_number(buf, 1)?;
    let mut name = 0..0;
    for at in 0..argc {
        if buf.get(pos) != Some(&b'$') {
            return None;
        }
        let (len, start) = short_number(buf, pos + 1)?;
        if at == 0 {
            name = start..start + len;
        }
        pos = start + len + 2;
    }
    (pos <= buf.len()).then_some(Request { len: pos, name, argc })
}

/// Reads `<digits>\r\n` starting at `from`; `None` while the line is incomplete. Accepts what
/// Redis's `string2ll` accepts: no sign but `-`, no leading zeros, no `-0`.
#[inline(always)]
fn read_number(buf: &[u8], from: usize, invalid: ProtocolError) -> Result<Option<(i64, usize)>, ProtocolError> {
    match short_number(buf, from) {
        Some((value, next)) => Ok(Some((value as i64, next))),
        None => read_longer_number(buf, from, invalid),
    }
}

/// One or two digits and `\r\n` at `from` (`*3`, `$3`, `$16`: nearly every header), read with
/// no call and no loop, which matters at a few headers per request. The value and where the line
/// ends; `None` for anything else (and while the next byte has not arrived), which
/// [`read_longer_number`] then reads.
#[inline(always)]
fn short_number(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    match *buf.get(from..from + 4)? {
        [unit @ b'0'..=b'9', b'\r', b'\n', _] => Some((usize::from(unit - b'0'), from + 3)),
        [ten @ b'1'..=b'9', unit @ b'0'..=b'9', b'\r', b'\n'] => {
            Some((usize::from(ten - b'0') * 10 + usize::from(unit - b'0'), from + 4))
        }
        _ => None,
    }
}

/// [`read_number`] for every other line: longer, incomplete, negative or malformed.
#[inline(never)]
fn read_longer_number(buf: &[u8], from: usize, invalid: ProtocolError) -> Result<Option<(i64, usize)>, ProtocolError> {
    if let Some(found) = read_plain_number(buf, from) {
        return Ok(Some(found));
    }
    let Some(line_end) = buf.get(from..).and_then(|rest| rest.iter().position(|&b| b == b'\r')) else {
        return Ok(None);
    };
    let line_end = from + line_end;
    match buf.get(line_end + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(invalid),
    }
    let digits = &buf[from..line_end];
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    let leading_zero = digits.first() == Some(&b'0') && (negative || digits.len() > 1);
    if digits.is_empty() || digits.len() > 18 || leading_zero || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid);
    }
    let value = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Ok(Some((if negative { -value } else { value }, line_end + 2)))
}

/// The line every well-formed header has, in one pass: 1 to 18 digits without a leading zero,
/// then `\r\n`. `None` for anything else (incomplete, negative, malformed), which
/// [`read_longer_number`] then looks at closely; on this path the result is the same as its.
fn read_plain_number(buf: &[u8], from: usize) -> Option<(i64, usize)> {
    let digits = buf.get(from..)?;
    let mut value = 0i64;
    for (at, &byte) in digits.iter().enumerate().take(19) {
        match byte {
            b'0'..=b'9' if at < 18 && !(at == 1 && digits[0] == b'0') => value = value * 10 + i64::from(byte - b'0'),
            b'\r' if at > 0 && digits.get(at + 1) == Some(&b'\n') => return Some((value, from + at + 2)),
            _ => return None,
        }
    }
    None
}

/// An inline request: one line, words separated by spaces. Redis itself parses the line
/// (quotes included); the proxy only needs its end and words.
fn scan_inline(buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
    // The limit applies to the line, found or not, so the outcome never depends on how the
    // bytes were split across reads.
    let Some(newline) = buf.iter().take(MAX_INLINE_LEN + 1).position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE_LEN {
            return Err(ProtocolError::InlineTooBig);
        }
        return Ok(None);
    };
    let request = Request { len: newline + 1, name: 0..0, argc: 0 };
    let mut words = request.args(buf);
    let name = words.next().unwrap_or(0..0);
    let argc = usize::from(!name.is_empty()) + words.count();
    Ok(Some(Request { name, argc, ..request }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request in `input` as its arguments (name first) and its `argc`.
    fn scan_all(input: &[u8]) -> Result<Vec<(Vec<String>, usize)>, ProtocolError> {
        let mut scanner = RequestScanner::default();
        let mut offset = 0;
        let mut out = Vec::new();
        while let Some(request) = scanner.scan(&input[offset..])? {
            let bytes = &input[offset..];
            let args: Vec<String> =
                request.args(bytes).map(|arg| String::from_utf8_lossy(&bytes[arg]).into_owned()).collect();
            assert_eq!(args.len(), request.argc);
            assert_eq!(args.first().map(String::as_bytes).unwrap_or_default(), &bytes[request.name.clone()]);
            out.push((args, request.argc));
            offset += request.len;
        }
        assert_eq!(offset, input.len(), "everything was consumed");
        Ok(out)
    }

    #[test]
    fn arrays_and_inline_requests_are_found_with_their_arguments() {
        let pipeline =
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\nPING\r\n*1\r\n$4\r\nPING\r\nget  other\t x\r\n*0\r\n\r\n";
        let found = scan_all(pipeline).unwrap();
        let words = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            found,
            [
                (words(&["SET", "key", "value"]), 3),
                (words(&["PING"]), 1),
                (words(&["PING"]), 1),
                (words(&["get", "other", "x"]), 3),
                (vec![], 0),
                (vec![], 0),
            ]
        );
    }

    #[test]
    fn a_request_arriving_byte_by_byte_completes_exactly_once() {
        let request = b"*2\r\n$4\r\nECHO\r\n$12\r\nhello\r\nworld\r\n";
        let mut scanner = RequestScanner::default();
        for end in 0..request.len() {
            assert_eq!(scanner.scan(&request[..end]).unwrap(), None, "incomplete at {end}");
        }
        let complete = scanner.scan(request).unwrap().unwrap();
        assert_eq!((complete.len, complete.argc), (request.len(), 2));
        let second = complete.args(request).nth(1).unwrap();
        assert_eq!(&request[second], b"hello\r\nworld", "binary-safe");
    }

    #[test]
    fn malformed_requests_get_redis_protocol_errors() {
        use ProtocolError::*;
        let cases: [(&[u8], ProtocolError); 9] = [
            (b"*2\r\n:1\r\n", ExpectedBulk(b':')),
            (b"*x\r\n", InvalidMultibulkLength),
            (b"*01\r\n", InvalidMultibulkLength),
            (b"*1\r\n$-3\r\n", InvalidBulkLength),
            (b"*1\r\n$-0\r\n", InvalidBulkLength),
            (b"*1\r\n$03\r\nGET\r\n", InvalidBulkLength),
            (b"*1\r\n$536870913\r\n", InvalidBulkLength),
            (b"*1\r\n$3\rX", InvalidBulkLength),
            (b"*99999999999999999999\r\n", InvalidMultibulkLength),
        ];
        for (input, expected) in cases {
            let err = RequestScanner::default().scan(input).expect_err("malformed");
            assert_eq!(err, expected, "for {:?}", String::from_utf8_lossy(input));
        }
        let endless_inline = vec![b'a'; MAX_INLINE_LEN + 1];
        assert_eq!(RequestScanner::default().scan(&endless_inline).unwrap_err(), InlineTooBig);
        let long_line = [vec![b'a'; MAX_INLINE_LEN + 1], b"\r\n".to_vec()].concat();
        assert_eq!(RequestScanner::default().scan(&long_line).unwrap_err(), InlineTooBig);
        assert_eq!(InvalidBulkLength.to_resp(), "-ERR Protocol error: invalid bulk length\r\n");
        assert_eq!(ExpectedBulk(b':').to_resp(), "-ERR Protocol error: expected '$', got ':'\r\n");
        assert_eq!(ExpectedBulk(b'\r').to_resp(), "-ERR Protocol error: expected '$', got '\\r'\r\n", "one line");
    }

    #[test]
    fn the_two_bytes_after_bulk_data_are_skipped_unread_as_redis_does() {
        let input = b"*1\r\n$3\r\nGETxxPING\r\n";
        assert_eq!(scan_all(input).unwrap(), [(vec!["GET".to_string()], 1), (vec!["PING".to_string()], 1)]);
    }

    #[test]
    fn a_bulk_header_announcing_the_limit_waits_for_its_data() {
        let header = format!("*1\r\n${MAX_BULK_LEN}\r\n");
        assert_eq!(RequestScanner::default().scan(header.as_bytes()).unwrap(), None);
    }

    /// Random and mutated inputs never panic, never claim more bytes than they were given, walk
    /// back into their arguments, and find the same request by the one-pass path as by the full
    /// scan. (The cargo-fuzz target in `fuzz/` goes further.)
    #[test]
    fn arbitrary_bytes_never_panic() {
        let seeds: [&[u8]; 4] = [
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
            b"PING\r\n",
            b"*1\r\n$-1\r\n",
            b"*2\r\n$0\r\n\r\n$12\r\nhello world!\r\n",
        ];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..20_000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            for _ in 0..(next() % 6) {
                let at = (next() as usize) % (input.len() + 1);
                match next() % 3 {
                    0 if at < input.len() => input[at] = next() as u8,
                    1 => input.insert(at, b"*$\r\n-0123456789"[(next() % 15) as usize]),
                    _ => input.truncate(at.max(1)),
                }
            }
            let mut scanner = RequestScanner::default();
            let mut offset = 0;
            loop {
                let found = scanner.scan(&input[offset..]);
                let full = RequestScanner::default().scan_resumable(&input[offset..]);
                assert_eq!(found, full, "for {:?}", String::from_utf8_lossy(&input[offset..]));
                let Ok(Some(request)) = found else { break };
                assert!(request.len > 0 && offset + request.len <= input.len());
                let bytes = &input[offset..];
                assert_eq!(request.args(bytes).count(), request.argc);
                let _ = crate::command::Command::of(bytes, &request);
                offset += request.len;
            }
        }
    }
}
