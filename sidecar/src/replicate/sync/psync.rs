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
    /// The stream continues after the requested position (under the replication ID the source
    /// named, when it named one).
    Continue { position: Position },
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
            Ok(Outcome::Full { position: Position { replid, offset, db: 0, held: false }, framing })
        }
        // Only a request from a position can continue; a server that says so to `PSYNC ? -1`
        // is not one Eden can replicate.
        Some("+CONTINUE") => match from {
            Some(from) => {
                let replid = words.next().map_or_else(|| from.replid.clone(), str::to_string);
                Ok(Outcome::Continue { position: Position { replid, ..from.clone() } })
            }
            None => Err(refused(link, "PSYNC", &reply)),
        },
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
        let newlines = link.conn.buf.iter().take_while(|&&b| b == b'\n').count();
        let _ = link.conn.buf.split_to(newlines);
        if let Some(end) = link.conn.buf.windows(2).position(|w| w == b"\r\n") {
            let line = link.conn.buf.split_to(end + 2);
            return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        if link.conn.buf.len() > MAX_LINE {
            return Err(link.error("a reply line longer than any handshake reply"));
        }
        link.fill(1).await?;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::replicate::sync::link::Address;
    use crate::upstream::{Server, TlsSettings};

    /// A server that answers the two REPLCONFs with +OK and PSYNC with `psync_reply`: no real
    /// Redis answers `+CONTINUE` to `PSYNC ? -1`, so this one is made up.
    async fn handshake_with(psync_reply: &'static str, from: Option<&Position>) -> Result<Outcome, ReplicateError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("redis://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 4096];
            for reply in ["+OK\r\n", "+OK\r\n", psync_reply] {
                let _ = peer.read(&mut request).await.unwrap();
                peer.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let mut link = Address::whole("source", &Server::parse(&uri, TlsSettings::default()).unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
        handshake(&mut link, from).await
    }

    #[tokio::test]
    async fn continue_is_taken_only_where_a_position_was_asked_for() {
        let recorded = Position { replid: "a".repeat(40), offset: 1000, db: 3, held: true };
        match handshake_with("+CONTINUE\r\n", Some(&recorded)).await {
            Ok(Outcome::Continue { position }) => assert_eq!(position, recorded),
            other => panic!("{other:?}"),
        }
        let renamed = handshake_with("+CONTINUE bbbb\r\n", Some(&recorded)).await;
        assert!(
            matches!(renamed, Ok(Outcome::Continue { position }) if position.replid == "bbbb" && position.offset == 1000)
        );
        let refused = handshake_with("+CONTINUE\r\n", None).await;
        assert!(matches!(refused, Err(ReplicateError::SyncRefused { command: "PSYNC", .. })), "{refused:?}");
    }
}
