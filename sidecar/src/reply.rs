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
        while replies < max && matches!(buf.get(pos), Some(b'+' | b':' | b'_' | b'#' | b',' | b'(')) {
            let Some(newline) = buf[pos..].iter().position(|&b| b == b'\n') else { break };
            pos += newline + 1;
            replies += 1;
        }
        (pos, replies)
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

/// The count in a `$`/`*`-style header (`-1` and friends are nulls: `None`).
fn parse_count(line: &[u8]) -> Option<usize> {
    let digits = line.strip_suffix(b"\r\n").unwrap_or(line);
    std::str::from_utf8(digits).ok()?.parse().ok()
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

    #[test]
    fn every_reply_type_ends_where_it_should_however_reads_split_it() {
        let replies: [&[u8]; 14] = [
            b"+OK\r\n",
            b"-ERR wrong\r\n",
            b":42\r\n",
            b"$5\r\nhe\r\nl\r\n",
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
        let all: Vec<u8> = replies.concat();
        let mut ends = vec![];
        let mut end = 0;
        for reply in replies {
            end += reply.len();
            ends.push((end, Frame::Reply));
        }
        for chunk in [1, 2, 3, 7, all.len()] {
            assert_eq!(frames(&all, chunk), ends, "reads of {chunk} bytes");
        }
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
