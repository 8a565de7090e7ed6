//! One health probe of a Redis server: connect (TLS when `rediss://`), AUTH when credentials
//! are given, PING for latency, INFO for version and role. Every step has a deadline, so an
//! unreachable server costs the reconciler at most [`PROBE_TIMEOUT`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::ServerName, pki_types::pem::PemObject};

use super::ConnectionSettings;

pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a successful probe saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub server_version: String,
    /// `master` or `slave`, as INFO replication says.
    pub role: String,
    pub latency: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{uri} is not a redis:// or rediss:// URI with host and port")]
    BadUri { uri: String },
    #[error("{addr} unreachable: {source}")]
    Unreachable { addr: String, source: std::io::Error },
    #[error("TLS to {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("{addr} did not answer within {PROBE_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("{addr} refused {command}: {reply}")]
    Refused { addr: String, command: &'static str, reply: String },
    #[error("{addr} sent a reply that is not RESP: {reason}")]
    Protocol { addr: String, reason: String },
}

/// Probes the server `settings` describe.
pub async fn probe(settings: &ConnectionSettings) -> Result<ProbeReport, ProbeError> {
    let address = Address::parse(&settings.uri)?;
    let addr = address.host_port();
    tokio::time::timeout(PROBE_TIMEOUT, async {
        let tcp =
            TcpStream::connect(&addr).await.map_err(|source| ProbeError::Unreachable { addr: addr.clone(), source })?;
        tcp.set_nodelay(true).ok();
        if address.tls {
            let tls = connect_tls(tcp, &address, settings).await?;
            exchange(tls, &addr, settings, address.db).await
        } else {
            exchange(tcp, &addr, settings, address.db).await
        }
    })
    .await
    .unwrap_or_else(|_| Err(ProbeError::Timeout { addr: addr.clone() }))
}

struct Address {
    tls: bool,
    host: String,
    port: u16,
    db: u16,
}

impl Address {
    fn parse(uri: &str) -> Result<Self, ProbeError> {
        let bad = || ProbeError::BadUri { uri: uri.to_string() };
        let (tls, rest) = match uri.split_once("://") {
            Some(("redis", rest)) => (false, rest),
            Some(("rediss", rest)) => (true, rest),
            _ => return Err(bad()),
        };
        let (authority, db) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "6379"));
        let port = port.parse().map_err(|_| bad())?;
        let db = if db.is_empty() { 0 } else { db.parse().map_err(|_| bad())? };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Address { tls, host: host.to_string(), port, db })
    }

    fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

async fn connect_tls(
    tcp: TcpStream,
    address: &Address,
    settings: &ConnectionSettings,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProbeError> {
    let addr = address.host_port();
    let tls_error = |reason: String| ProbeError::Tls { addr: addr.clone(), reason };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?;
    let config = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &settings.ca_pem {
            Some(pem) => {
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(cert.map_err(|e| tls_error(format!("CA bundle: {e}")))?)
                        .map_err(|e| tls_error(e.to_string()))?;
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let name = settings.server_name.clone().unwrap_or_else(|| address.host.clone());
    let server_name = ServerName::try_from(name).map_err(|e| tls_error(e.to_string()))?;
    TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await.map_err(|e| tls_error(e.to_string()))
}

/// For `insecureSkipVerify`: signatures are still checked, the certificate chain is not.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn exchange<S>(
    mut stream: S,
    addr: &str,
    settings: &ConnectionSettings,
    db: u16,
) -> Result<ProbeReport, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conversation = Conversation { stream: &mut stream, addr, buffer: Vec::with_capacity(4096) };
    if let Some(password) = &settings.password {
        let mut auth = vec!["AUTH"];
        auth.extend(settings.username.as_deref());
        auth.push(password);
        conversation.ask("AUTH", &auth).await?;
    }
    if db != 0 {
        conversation.ask("SELECT", &["SELECT", &db.to_string()]).await?;
    }
    let started = Instant::now();
    conversation.ask("PING", &["PING"]).await?;
    let latency = started.elapsed();
    let info = match conversation.ask("INFO", &["INFO", "server"]).await? {
        OwnedFrame::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        other => {
            return Err(ProbeError::Protocol { addr: addr.to_string(), reason: format!("INFO replied {other:?}") });
        }
    };
    let replication = match conversation.ask("INFO", &["INFO", "replication"]).await? {
        OwnedFrame::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        _ => String::new(),
    };
    Ok(ProbeReport {
        server_version: info_field(&info, "redis_version").unwrap_or("unknown").to_string(),
        role: info_field(&replication, "role").unwrap_or("unknown").to_string(),
        latency,
    })
}

struct Conversation<'a, S> {
    stream: &'a mut S,
    addr: &'a str,
    buffer: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conversation<'_, S> {
    /// Sends one command and reads its reply; an error reply is a [`ProbeError::Refused`].
    async fn ask(&mut self, command: &'static str, args: &[&str]) -> Result<OwnedFrame, ProbeError> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        let io_error = |source| ProbeError::Unreachable { addr: self.addr.to_string(), source };
        self.stream.write_all(request.as_bytes()).await.map_err(io_error)?;
        loop {
            match decode(&self.buffer) {
                Ok(Some((frame, used))) => {
                    self.buffer.drain(..used);
                    return match frame {
                        OwnedFrame::Error(reply) => {
                            Err(ProbeError::Refused { addr: self.addr.to_string(), command, reply })
                        }
                        frame => Ok(frame),
                    };
                }
                Ok(None) => {}
                Err(err) => return Err(ProbeError::Protocol { addr: self.addr.to_string(), reason: err.to_string() }),
            }
            let mut chunk = [0u8; 4096];
            let read = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|source| ProbeError::Unreachable { addr: self.addr.to_string(), source })?;
            if read == 0 {
                let source = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
                return Err(ProbeError::Unreachable { addr: self.addr.to_string(), source });
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_with_defaults() {
        let plain = Address::parse("redis://10.0.1.50").unwrap();
        assert_eq!((plain.tls, plain.host_port(), plain.db), (false, "10.0.1.50:6379".to_string(), 0));
        let tls = Address::parse("rediss://cache.example.com:6380/3").unwrap();
        assert_eq!((tls.tls, tls.host_port(), tls.db), (true, "cache.example.com:6380".to_string(), 3));
        assert!(Address::parse("http://example.com").is_err());
        assert!(Address::parse("redis://host:notaport").is_err());
    }

    #[test]
    fn info_fields_are_read_by_exact_name() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_version_extra:x\r\n";
        assert_eq!(info_field(info, "redis_version"), Some("7.0.15"));
        assert_eq!(info_field("role:master\r\n", "role"), Some("master"));
        assert_eq!(info_field(info, "role"), None);
    }
}
