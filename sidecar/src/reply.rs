//! Reply boundaries in an upstream's bytes.
//!
//! A plain proxy copies replies without looking at them. Once a client's requests are spread
//! over two servers, the proxy has to know where each reply ends to put them back in request
//! order, and to tell a reply from a RESP3 push (client-side caching invalidations), which
//! answers no request. [`ReplyScanner`] finds those boundaries in RESP2 and RESP3 without
//! allocating and without buffering a whole reply: it keeps its place across reads, so a
//! large bulk string can be passed on as it arrives.

/// A reply the upstream sent that the proxy cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unexpected byte {:?} where a RESP reply should start", std::ascii::escape_default(*.0).to_string())]
pub struct ReplyError(pub u8);

/// What a complete top-level frame was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// The answer to one request.
    Reply,
    /// An out-of-band RESP3 push (`>`): answers no request.
    Push,
}

/// What [`ReplyScanner::replies`] passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Bytes consumed: whole replies and pushes, and the start of one that is not complete.
    pub len: usize,
    /// Replies completed (pushes not counted).
    pub replies: u32,
    /// What stopped the scan, when `buf` holds something that is not RESP; the bytes before
    /// it are consumed.
    pub error: Option<ReplyError>,
}

/// Finds the end of each top-level frame, resuming across calls.
#[derive(Debug, Clone, Default)]
pub struct ReplyScanner {
    /// Inside a top-level frame: elements still to read.
    pending: usize,
    /// Bytes of a bulk string's body (and its CRLF) still to pass.
    skip: usize,
    in_frame: bool,
    push: bool,
}

impl ReplyScanner {
    /// Whether the scanner sits between top-level frames.
    pub fn at_boundary(&self) -> bool {
        !self.in_frame
    }

    /// Passes up to `max` complete single-line replies other than errors (`+OK`, integers,
    /// RESP3 nulls, booleans and numbers) at the front of `buf`, when the scanner sits between
    /// frames: the common answers to writes, counted with no state to keep. Returns the bytes
    /// and replies passed; it stops at anything else (an error, a bulk or aggregate reply, a
    /// push, an incomplete line), which [`scan`](Self::scan) then reads.
    pub fn single_lines(&self, buf: &[u8], max: u32) -> (usize, u32) {
        let (mut pos, mut replies) = (0, 0);
        if self.in_frame {
            return (pos, replies);
        }
        while replies < max
            && matches!(buf.get(pos), Some(b'+' | b':' | b'_' | b'#' | b',' | b'('))
            && let Some(len) = whole_reply(&buf[pos..])
        {
            pos += len;
            replies += 1;
        }
        (pos, replies)
    }

    /// Passes up to `max` complete replies at the front of `buf` (the bytes after the last
    /// call's consumed ones), with the RESP3 pushes among them, resuming where the last call
    /// stopped; consumed bytes are final, as with [`scan`](Self::scan).
    ///
    /// This is how a session counts replies back, so the common answers take a short path:
    /// between frames, a single-line reply (`+OK`, an integer, an error…) or a bulk string
    /// whose header is canonical (`$<digits>\r\n` or `$-1\r\n`) and whose body is all in
    /// `buf` is passed whole, with no state to keep. Anything else (an aggregate, a push, a
    /// frame that ends past `buf`, an unusual header) goes through `scan`, which the short
    /// path leaves exactly as it would have: it runs only where `scan` would have started a
    /// frame and consumed it whole.
    pub fn replies(&mut self, buf: &[u8], max: u32) -> Taken {
        let mut taken = Taken { len: 0, replies: 0, error: None };
        while taken.replies < max {
            if !self.in_frame
                && let Some(len) = whole_reply(&buf[taken.len..])
            {
                taken.len += len;
                taken.replies += 1;
                continue;
            }
            match self.scan(&buf[taken.len..]) {
                Ok((n, frame)) => {
                    taken.len += n;
                    match frame {
                        Some(Frame::Reply) => taken.replies += 1,
                        Some(Frame::Push) => {}
                        None => break,
                    }
                }
                Err(error) => {
                    taken.error = Some(error);
                    break;
                }
            }
        }
        taken
    }

    /// Scans `buf` (the bytes after the last call's consumed ones) up to the end of the next
    /// top-level frame. Returns how many bytes it consumed and, if the frame ended, what it
    /// was. Consumed bytes are final: the caller may pass them on and drop them. Fewer bytes
    /// than given are consumed when a header line is not complete yet.
    pub fn scan(&mut self, buf: &[u8]) -> Result<(usize, Option<Frame>), ReplyError> {
        let mut pos = 0;
        loop {
            if self.skip > 0 {
                let take = self.skip.min(buf.len() - pos);
                pos += take;
                self.skip -= take;
                if self.skip > 0 {
                    return Ok((pos, None));
                }
            }
            if self.in_frame && self.pending == 0 {
                self.in_frame = false;
                return Ok((pos, Some(if self.push { Frame::Push } else { Frame::Reply })));
            }
            let Some(newline) = buf[pos..].iter().position(|&b| b == b'\n') else { return Ok((pos, None)) };
            let line = &buf[pos..pos + newline + 1];
            let marker = line[0];
            if !self.in_frame {
                (self.in_frame, self.pending, self.push) = (true, 1, marker == b'>');
            }
            self.pending -= 1;
            let count = || parse_count(&line[1..]);
            match marker {
                b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {}
                b'$' | b'!' | b'=' => self.skip = count().map_or(0, |len| len + 2),
                b'*' | b'~' | b'>' => self.pending += count().unwrap_or(0),
                b'%' => self.pending += count().unwrap_or(0) * 2,
                // Attributes precede the value they describe.
                b'|' => self.pending += count().unwrap_or(0) * 2 + 1,
                other => return Err(ReplyError(other)),
            }
            pos += line.len();
        }
    }
}

/// The length of the complete single-line reply or bulk string `buf` starts with, when its
/// header is one the short path reads (see [`ReplyScanner::replies`]); `None` otherwise, and
/// for anything incomplete.
fn whole_reply(buf: &[u8]) -> Option<usize> {
    match *buf.first()? {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Some(buf.iter().position(|&b| b == b'\n')? + 1),
        b'$' => {
            if buf.get(1..5) == Some(b"-1\r\n") {
                return Some(5);
            }
            // Digits, then CRLF: a header `scan` would read as the same length.
            let (mut len, mut at) = (0usize, 1);
            while let Some(&digit @ b'0'..=b'9') = buf.get(at) {
                len = len.checked_mul(10)?.checked_add(usize::from(digit - b'0'))?;
                at += 1;
            }
            if at == 1 || buf.get(at..at + 2) != Some(b"\r\n") {
                return None;
            }
            let end = (at + 2).checked_add(len)?.checked_add(2)?;
            (end <= buf.len()).then_some(end)
        }
        _ => None,
    }
}

/// The count in a `$`/`*`-style header (`-1` and friends are nulls: `None`).
fn parse_count(line: &[u8]) -> Option<usize> {
    let digits = line.strip_suffix(b"\r\n").unwrap_or(line);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0usize, |count, &digit| match digit {
        b'0'..=b'9' => count.checked_mul(10)?.checked_add(usize::from(digit - b'0')),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in `chunk`-byte reads; returns each frame's end offset and kind.
    fn frames(input: &[u8], chunk: usize) -> Vec<(usize, Frame)> {
        let (mut scanner, mut out, mut consumed, mut available) = (ReplyScanner::default(), vec![], 0, 0);
        while consumed < input.len() {
            available = (available + chunk).min(input.len());
            loop {
                let (n, frame) = scanner.scan(&input[consumed..available]).unwrap();
                consumed += n;
                match frame {
                    Some(frame) => out.push((consumed, frame)),
                    None => break,
                }
            }
        }
        out
    }

    /// One of each reply type, with the splits that trip a parser: bodies holding CRLF, nested
    /// aggregates, attributes, nulls, long integers.
    const EVERY_REPLY: [&[u8]; 15] = [
        b"+OK\r\n",
        b"-ERR wrong\r\n",
        b":42\r\n",
        b"$5\r\nhe\r\nl\r\n",
        b"$0\r\n\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n:2\r\n*0\r\n",
        b"_\r\n",
        b"#t\r\n",
        b",3.14\r\n",
        b"(12345678901234567890\r\n",
        b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n=8\r\ntxt:abcd\r\n",
        b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n",
        b"~1\r\n!3\r\nbad\r\n",
    ];

    /// Where each of [`EVERY_REPLY`] ends, concatenated.
    fn ends() -> Vec<usize> {
        let mut end = 0;
        EVERY_REPLY
            .iter()
            .map(|reply| {
                end += reply.len();
                end
            })
            .collect()
    }

    #[test]
    fn every_reply_type_ends_where_it_should_however_reads_split_it() {
        let all: Vec<u8> = EVERY_REPLY.concat();
        let ends: Vec<_> = ends().into_iter().map(|end| (end, Frame::Reply)).collect();
        for chunk in [1, 2, 3, 7, all.len()] {
            assert_eq!(frames(&all, chunk), ends, "reads of {chunk} bytes");
        }
    }

    /// Counts `input`'s replies `max` at a time from reads of `chunk` bytes, as a session does;
    /// returns where each run of `max` left off, and the bytes consumed.
    fn counted(input: &[u8], chunk: usize, max: u32) -> (Vec<usize>, usize) {
        let (mut scanner, mut stops, mut consumed, mut available) = (ReplyScanner::default(), vec![], 0, 0);
        let mut left = max;
        while consumed < input.len() {
            available = (available + chunk).min(input.len());
            loop {
                let taken = scanner.replies(&input[consumed..available], left);
                assert_eq!(taken.error, None);
                (consumed, left) = (consumed + taken.len, left - taken.replies);
                if left > 0 {
                    break;
                }
                stops.push(consumed);
                left = max;
            }
        }
        (stops, consumed)
    }

    #[test]
    fn replies_are_counted_where_scan_ends_them_with_pushes_passed_between() {
        let push: &[u8] = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n";
        // A push before the first reply: passed with it, not counted.
        let all = [push, &EVERY_REPLY.concat()].concat();
        let ends: Vec<usize> = ends().into_iter().map(|end| end + push.len()).collect();
        for chunk in [1, 2, 3, 7, all.len()] {
            assert_eq!(counted(&all, chunk, 1), (ends.clone(), all.len()), "one at a time, reads of {chunk} bytes");
            let threes: Vec<usize> = ends.iter().copied().skip(2).step_by(3).collect();
            assert_eq!(counted(&all, chunk, 3), (threes, all.len()), "three at a time, reads of {chunk} bytes");
        }
    }

    #[test]
    fn the_short_path_reads_only_headers_scan_reads_the_same_way() {
        // Read by scan alone: a body not all here yet (passed as it comes), a sign and a header
        // without its CR (nulls), a length past any buffer (a null too).
        for (input, len, replies) in [
            (&b"$5\r\nhel"[..], 7, 0),
            (b"$+2\r\n+OK\r\n", 5, 1),
            (b"$2\n+OK\r\n", 3, 1),
            (b"$99999999999999999999999\r\n", 26, 1),
        ] {
            let taken = ReplyScanner::default().replies(input, 1);
            assert_eq!((taken.len, taken.replies), (len, replies), "{:?}", String::from_utf8_lossy(input));
        }
        let taken = ReplyScanner::default().replies(b"+OK\r\n?\r\n", 2);
        assert_eq!(taken, Taken { len: 5, replies: 1, error: Some(ReplyError(b'?')) }, "what came before is passed");
    }

    #[test]
    fn pushes_are_told_apart_from_replies() {
        let input = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n:1\r\n";
        assert_eq!(frames(input, 5), vec![(32, Frame::Push), (36, Frame::Reply)]);
    }

    #[test]
    fn single_lines_pass_runs_of_simple_replies_and_stop_where_scan_must_read() {
        let scanner = ReplyScanner::default();
        let input = b"+OK\r\n:7\r\n_\r\n+OK\r\n-ERR no\r\n+OK\r\n";
        assert_eq!(scanner.single_lines(input, 100), (17, 4), "up to the error");
        assert_eq!(scanner.single_lines(input, 2), (9, 2), "no more than asked");
        assert_eq!(scanner.single_lines(b"+OK\r\n$2\r\nhi\r\n", 9), (5, 1), "up to a bulk string");
        assert_eq!(scanner.single_lines(b"+OK\r\n+O", 9), (5, 1), "up to an incomplete line");
        assert_eq!(scanner.single_lines(b">1\r\n+OK\r\n", 9), (0, 0), "not a push");
        let mut inside = ReplyScanner::default();
        assert_eq!(inside.scan(b"*2\r\n+OK\r\n"), Ok((9, None)));
        assert_eq!(inside.single_lines(b"+OK\r\n", 9), (0, 0), "not inside a frame");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(ReplyScanner::default().scan(b"?\r\n"), Err(ReplyError(b'?')));
        assert_eq!(ReplyScanner::default().scan(b"$abc\r\n"), Ok((6, Some(Frame::Reply))), "read as a null");
    }
}
