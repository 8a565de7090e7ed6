//! The replica handshake: REPLCONF, then PSYNC, and the source's answer.
//!
//! Eden announces `capa eof` (it reads diskless snapshots, framed by an end mark instead of a
//! length) and `capa psync2` (it can continue after the source's failover changed the
//! replication ID). `PSYNC <replid> <offset+1>` asks to continue where the target's record
//! says; `PSYNC ? -1` asks for a full copy.

use super::link::Link;
use super::rdb::Framing;
use super::target::Position;
use crate::replicate::ReplicateError;

/// What the source agreed to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A snapshot follows, taken at `position`; then the stream from there.
    Full { position: Position, framing: Framing },
    /// The stream continues after the requested offset, under this replication ID.
    Continue { replid: String },
}

/// Runs the handshake on a fresh connection to the source.
pub(crate) async fn handshake(link: &mut Link, from: Option<&Position>) -> Result<Outcome, ReplicateError> {
    replconf(link, &[b"REPLCONF", b"listening-port", b"0"]).await?;
    replconf(link, &[b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"]).await?;
    let request = match from {
        Some(p) => vec![b"PSYNC".to_vec(), p.replid.clone().into_bytes(), (p.offset + 1).to_string().into_bytes()],
        None => vec![b"PSYNC".to_vec(), b"?".to_vec(), b"-1".to_vec()],
    };
    link.send(&super::link::encode(&request.iter().map(Vec::as_slice).collect::<Vec<_>>())).await?;
    let reply = line(link).await?;
    let mut words = reply.split(' ');
    match words.next() {
        Some("+FULLRESYNC") => {
            let replid = words.next().unwrap_or_default().to_string();
            let offset = words.next().and_then(|o| o.parse().ok());
            let Some(offset) = offset.filter(|_| !replid.is_empty()) else {
                return Err(link.error(format!("unreadable PSYNC reply `{reply}`")));
            };
            let framing = preamble(link).await?;
            Ok(Outcome::Full { position: Position { replid, offset, db: 0 }, framing })
        }
        Some("+CONTINUE") => {
            let replid = words.next().map(str::to_string).or_else(|| from.map(|p| p.replid.clone()));
            Ok(Outcome::Continue { replid: replid.unwrap_or_default() })
        }
        _ => Err(refused(link, "PSYNC", &reply)),
    }
}

async fn replconf(link: &mut Link, args: &[&[u8]]) -> Result<(), ReplicateError> {
    link.send(&super::link::encode(args)).await?;
    let reply = line(link).await?;
    if reply == "+OK" { Ok(()) } else { Err(refused(link, "REPLCONF", &reply)) }
}

fn refused(link: &Link, command: &'static str, reply: &str) -> ReplicateError {
    ReplicateError::SyncRefused {
        server: link.label().clone(),
        command,
        reply: reply.trim_start_matches(['-', '+']).to_string(),
    }
}

/// `$<len>` or `$EOF:<40-byte mark>`, after any newlines the source sends to keep the link
/// alive while it prepares the snapshot.
async fn preamble(link: &mut Link) -> Result<Framing, ReplicateError> {
    let header = line(link).await?;
    let framing = match header.strip_prefix('$') {
        Some(rest) => match rest.strip_prefix("EOF:") {
            Some(mark) if mark.len() == 40 => Some(Framing::EofMark(mark.as_bytes().to_vec())),
            Some(_) => None,
            None => rest.parse().ok().map(Framing::Length),
        },
        None => None,
    };
    framing.ok_or_else(|| link.error(format!("unexpected snapshot header `{header}`")))
}

/// One `\r\n`-terminated line, skipping the bare `\n` keep-alives before it.
async fn line(link: &mut Link) -> Result<String, ReplicateError> {
    const MAX_LINE: usize = 1024;
    loop {
        let newlines = link.buf.iter().take_while(|&&b| b == b'\n').count();
        let _ = link.buf.split_to(newlines);
        if let Some(end) = link.buf.windows(2).position(|w| w == b"\r\n") {
            let line = link.buf.split_to(end + 2);
            return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        if link.buf.len() > MAX_LINE {
            return Err(link.error("a reply line longer than any handshake reply"));
        }
        link.fill(1).await?;
    }
}
