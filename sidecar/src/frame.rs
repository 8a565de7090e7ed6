//! Request boundaries in the client's bytes.
//!
//! The proxy forwards the client's own bytes untouched; all it needs from a request is where
//! it ends, the command name and the first argument (the key, for most commands), as ranges
//! into the buffer. Requests are only ever arrays of bulk strings (`*N\r\n$len\r\n…`) or inline
//! lines (`PING\r\n`), so this is a small scanner rather than a general RESP decoder:
//! `redis_protocol::resp2::decode::decode_range` would allocate a `Vec` per request and start
//! over on every read of a partly received frame, which turns one large pipelined array into
//! quadratic work. [`RequestScanner`] keeps its place across reads and allocates nothing.
//!
//! Limits and error texts follow redis-server, so a client sees the same protocol errors it
//! would see without Eden.

use std::ops::Range;

/// Largest bulk string, as Redis's default `proto-max-bulk-len`.
pub const MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Largest array, as Redis (`INT_MAX` elements).
pub const MAX_MULTIBULK_LEN: usize = i32::MAX as usize;
/// Longest inline request, as Redis's `PROTO_INLINE_MAX_SIZE`.
pub const MAX_INLINE_LEN: usize = 64 * 1024;

/// A complete request at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes the request occupies, from the start of the buffer.
    pub len: usize,
    /// The command name; empty for an empty request (`*0`, a blank inline line).
    pub name: Range<usize>,
    /// The first argument after the name, if any.
    pub first_arg: Option<Range<usize>>,
    /// Arguments including the name.
    pub argc: usize,
}

/// Malformed input: the connection is answered with this error and closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub &'static str);

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
    first_arg: Option<Range<usize>>,
}

impl RequestScanner {
    /// The request at the front of `buf`, `None` if it is not complete yet. `buf` must start
    /// where the previous complete request ended and only grow between calls that return `None`.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
        let mut state = match self.partial.take() {
            Some(state) => state,
            None => match buf.first() {
                None => return Ok(None),
                Some(b'*') => {
                    let Some((count, pos)) = read_number(buf, 1, "invalid multibulk length")? else {
                        return self.too_long_header(buf);
                    };
                    if count <= 0 {
                        return Ok(Some(Request { len: pos, name: 0..0, first_arg: None, argc: 0 }));
                    }
                    if count as usize > MAX_MULTIBULK_LEN {
                        return Err(ProtocolError("invalid multibulk length"));
                    }
                    Partial { pos, remaining: count as usize, argc: count as usize, name: 0..0, first_arg: None }
                }
                Some(_) => return scan_inline(buf),
            },
        };
        while state.remaining > 0 {
            let Some(&marker) = buf.get(state.pos) else { return self.suspend(state) };
            if marker != b'$' {
                return Err(ProtocolError(if marker.is_ascii_graphic() {
                    "expected '$'"
                } else {
                    "expected '$', got a control byte"
                }));
            }
            let Some((len, start)) = read_number(buf, state.pos + 1, "invalid bulk length")? else {
                if buf.len() - state.pos > 32 {
                    return Err(ProtocolError("invalid bulk length"));
                }
                return self.suspend(state);
            };
            if len < 0 || len as usize > MAX_BULK_LEN {
                return Err(ProtocolError("invalid bulk length"));
            }
            let end = start + len as usize;
            if buf.len() < end + 2 {
                return self.suspend(state);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("bulk string not terminated by CRLF"));
            }
            match state.argc - state.remaining {
                0 => state.name = start..end,
                1 => state.first_arg = Some(start..end),
                _ => {}
            }
            state.pos = end + 2;
            state.remaining -= 1;
        }
        Ok(Some(Request { len: state.pos, name: state.name, first_arg: state.first_arg, argc: state.argc }))
    }

    fn suspend(&mut self, state: Partial) -> Result<Option<Request>, ProtocolError> {
        self.partial = Some(state);
        Ok(None)
    }

    fn too_long_header(&self, buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
        if buf.len() > 32 { Err(ProtocolError("invalid multibulk length")) } else { Ok(None) }
    }
}

/// Reads `<digits>\r\n` starting at `from`; `None` while the line is incomplete.
fn read_number(buf: &[u8], from: usize, error: &'static str) -> Result<Option<(i64, usize)>, ProtocolError> {
    let invalid = || ProtocolError(error);
    let Some(line_end) = buf.get(from..).and_then(|rest| rest.iter().position(|&b| b == b'\r')) else {
        return Ok(None);
    };
    let line_end = from + line_end;
    match buf.get(line_end + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(invalid()),
    }
    let digits = &buf[from..line_end];
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    let value = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Ok(Some((if negative { -value } else { value }, line_end + 2)))
}

/// An inline request: one line, words separated by spaces. Redis itself parses the line
/// (quotes included); the proxy only needs its end and first word.
fn scan_inline(buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
    // The limit applies to the line, found or not, so the outcome never depends on how the
    // bytes were split across reads.
    let Some(newline) = buf.iter().take(MAX_INLINE_LEN + 1).position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE_LEN {
            return Err(ProtocolError("too big inline request"));
        }
        return Ok(None);
    };
    let line = &buf[..newline];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut words = line.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty());
    let range_of = |word: &[u8]| {
        let start = word.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + word.len()
    };
    let name = words.next().map(range_of).unwrap_or(0..0);
    let first_arg = words.next().map(range_of);
    let argc = usize::from(!name.is_empty()) + usize::from(first_arg.is_some()) + words.count();
    Ok(Some(Request { len: newline + 1, name, first_arg, argc }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Result<Vec<(String, Option<String>, usize)>, ProtocolError> {
        let mut scanner = RequestScanner::default();
        let mut offset = 0;
        let mut out = Vec::new();
        while let Some(request) = scanner.scan(&input[offset..])? {
            let text = |r: Range<usize>| String::from_utf8_lossy(&input[offset..][r]).into_owned();
            out.push((text(request.name.clone()), request.first_arg.clone().map(text), request.argc));
            offset += request.len;
        }
        assert_eq!(offset, input.len(), "everything was consumed");
        Ok(out)
    }

    #[test]
    fn arrays_and_inline_requests_are_found_with_name_and_key() {
        let pipeline =
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\nPING\r\n*1\r\n$4\r\nPING\r\nget  other\r\n*0\r\n";
        let found = scan_all(pipeline).unwrap();
        assert_eq!(
            found,
            [
                ("SET".into(), Some("key".into()), 3),
                ("PING".into(), None, 1),
                ("PING".into(), None, 1),
                ("get".into(), Some("other".into()), 2),
                (String::new(), None, 0),
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
        assert_eq!(&request[complete.first_arg.unwrap()], b"hello\r\nworld", "binary-safe");
    }

    #[test]
    fn malformed_requests_get_redis_protocol_errors() {
        let cases: [(&[u8], &str); 7] = [
            (b"*2\r\n:1\r\n", "expected '$'"),
            (b"*x\r\n", "invalid multibulk length"),
            (b"*1\r\n$-3\r\n", "invalid bulk length"),
            (b"*1\r\n$536870913\r\n", "invalid bulk length"),
            (b"*1\r\n$3\r\nGETxx", "bulk string not terminated by CRLF"),
            (b"*1\r\n$3\rX", "invalid bulk length"),
            (b"*99999999999999999999\r\n", "invalid multibulk length"),
        ];
        for (input, expected) in cases {
            let err = RequestScanner::default().scan(input).expect_err(expected);
            assert_eq!(err.0, expected, "for {:?}", String::from_utf8_lossy(input));
        }
        let endless_inline = vec![b'a'; MAX_INLINE_LEN + 1];
        assert_eq!(RequestScanner::default().scan(&endless_inline).unwrap_err().0, "too big inline request");
        let long_line = [vec![b'a'; MAX_INLINE_LEN + 1], b"\r\n".to_vec()].concat();
        assert_eq!(RequestScanner::default().scan(&long_line).unwrap_err().0, "too big inline request");
        assert_eq!(ProtocolError("invalid bulk length").to_resp(), "-ERR Protocol error: invalid bulk length\r\n");
    }

    #[test]
    fn a_bulk_header_announcing_the_limit_waits_for_its_data() {
        let header = format!("*1\r\n${MAX_BULK_LEN}\r\n");
        assert_eq!(RequestScanner::default().scan(header.as_bytes()).unwrap(), None);
    }

    /// Random and mutated inputs never panic and never claim more bytes than they were given.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let seeds: [&[u8]; 3] = [b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", b"PING\r\n", b"*1\r\n$-1\r\n"];
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
            while let Ok(Some(request)) = scanner.scan(&input[offset..]) {
                assert!(request.len > 0 && offset + request.len <= input.len());
                offset += request.len;
            }
        }
    }
}
