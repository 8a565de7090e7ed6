//! Connections to one Redis server: the single type behind which the data plane's upstream
//! lives, so a Redis Cluster upstream (slot routing, MOVED/ASK) can replace it later without
//! touching sessions or routing. The operator's probe and the replication engine connect
//! through it too, so TLS and URI handling exist once.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio_rustls::rustls::{self, ClientConfig};

/// A parsed `redis://host:port[/db]` or `rediss://host:port[/db]`: where a server is, never who
/// Eden is there (see [`Server`] for credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUri {
    pub tls: bool,
    /// A name or an IP address (an IPv6 one without its brackets).
    pub host: String,
    pub port: u16,
    pub db: u16,
}

impl RedisUri {
    /// Parses a URI without credentials: an address the data plane is given (a ConfigMap, a
    /// command line) holds none, so one that does is refused rather than sent as a password.
    pub fn parse(uri: &str) -> Result<Self, UpstreamError> {
        match parse_uri(uri)? {
            (parsed, None) => Ok(parsed),
            (_, Some(_)) => Err(UpstreamError::BadUri {
                uri: redacted(uri),
                why: "credentials do not belong in this URI; give them from a Secret or a file",
            }),
        }
    }

    /// `host:port` (an IPv6 address in brackets), as errors and logs name the server.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses `redis[s]://[[user]:password@]host[:port][/db]` with the `url` crate: IPv6 literals,
/// and a user and password percent-decoded (`p%40ss` is `p@ss`). A userinfo without a colon is
/// a password, as Redis clients read `redis://secret@host`. A query or fragment is refused: in
/// a password, `#` and `?` must be percent-encoded, and unencoded they would cut it short.
fn parse_uri(uri: &str) -> Result<(RedisUri, Option<Credentials>), UpstreamError> {
    let bad = |why| UpstreamError::BadUri { uri: redacted(uri), why };
    let url = url::Url::parse(uri).map_err(|_| bad("not a URI"))?;
    let tls = match url.scheme() {
        "redis" => false,
        "rediss" => true,
        _ => return Err(bad("the scheme must be redis:// or rediss://")),
    };
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a `?` or `#` (percent-encode them in a password: %3F, %23)"));
    }
    let host = match url.host() {
        Some(url::Host::Domain(name)) if !name.is_empty() => name.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(bad("no host")),
    };
    let db = match url.path().trim_start_matches('/') {
        "" => 0,
        db => db.parse().map_err(|_| bad("the path must be a database number"))?,
    };
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| bad("credentials that are not UTF-8"))
    };
    let credentials = match (url.username(), url.password()) {
        ("", None) => None,
        (password, None) => Some(Credentials { username: None, password: decode(password)? }),
        (user, Some(password)) => Some(Credentials {
            username: (!user.is_empty()).then(|| decode(user)).transpose()?,
            password: decode(password)?,
        }),
    };
    Ok((RedisUri { tls, host, port: url.port().unwrap_or(6379), db }, credentials))
}

/// `uri` for an error message: whatever stands between `://` and the last `@` replaced, so a URI
/// that fails to parse never prints its password, however badly it is encoded (a host, port or
/// database holds no `@`).
fn redacted(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else { return "<not a URI>".into() };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://<credentials>@{}", &rest[at + 1..]),
        None => uri.to_string(),
    }
}

/// One Redis server as Eden reaches it: where (the URI's address and database), how it is
/// trusted (TLS settings of its own), and who Eden is there (credentials, kept out of every URI
/// string, label and message). Every connection the replication engine and the operator open
/// is made from one. Its Debug output is safe: [`Credentials`] redacts the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub uri: RedisUri,
    pub credentials: Option<Credentials>,
    pub tls: TlsSettings,
}

impl Server {
    /// A server from a URI that may carry credentials (percent-encoded, see [`parse_uri`]).
    pub fn parse(uri: &str, tls: TlsSettings) -> Result<Self, UpstreamError> {
        let (uri, credentials) = parse_uri(uri)?;
        Ok(Server { uri, credentials, tls })
    }

    /// The same server with these credentials (from a Secret or a file) instead of the URI's.
    pub fn with_credentials(self, credentials: Option<Credentials>) -> Self {
        Server { credentials: credentials.or(self.credentials), ..self }
    }

    /// `host:port`: what logs, errors and conditions name the server by.
    pub fn addr(&self) -> String {
        self.uri.host_port()
    }
}

/// TLS trust settings for `rediss://` upstreams.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM CA bundle; the system roots when absent.
    pub ca_pem: Option<Vec<u8>>,
    /// Name to verify the certificate against, when it is not the URI's host.
    pub server_name: Option<String>,
    /// Accept any certificate (testing only).
    pub insecure_skip_verify: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(Vec::len))
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{uri} is not a usable redis:// or rediss:// URI (redis://host:port[/db]): {why}")]
    BadUri { uri: String, why: &'static str },
    #[error("upstream {addr} unreachable: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("upstream {addr} unreachable: no connection within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("upstream {addr}: TLS failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("upstream {addr} refused {command}: {reply}")]
    Refused { addr: String, command: &'static str, reply: String },
}

/// What Eden authenticates with, for connections it opens on its own behalf (the operator's
/// probe and replication, the target's Secret). Client connections pass the client's AUTH
/// through instead.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: String,
}

impl Credentials {
    /// Credentials kept in files, as a mounted Secret holds them: the password in `path` (a
    /// trailing newline dropped) and the user name, if any, in `username` beside it. Nothing
    /// secret then needs to be on a command line.
    pub fn from_file(path: &Path) -> io::Result<Self> {
        let read =
            |path: &Path| std::fs::read_to_string(path).map(|text| text.trim_end_matches(['\r', '\n']).to_string());
        let password = read(path)?;
        let username = path.parent().and_then(|dir| read(&dir.join("username")).ok()).filter(|u| !u.is_empty());
        Ok(Credentials { username, password })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// How to reach one Redis server; cheap to clone, shared by every session.
#[derive(Clone)]
pub struct Upstream {
    uri: RedisUri,
    addr: Arc<str>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    credentials: Option<Credentials>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("uri", &self.uri).field("tls", &self.tls.is_some()).finish()
    }
}

impl Upstream {
    pub fn new(uri: &str, tls: &TlsSettings, connect_timeout: Duration) -> Result<Self, UpstreamError> {
        Self::with_address(RedisUri::parse(uri)?, tls, connect_timeout)
    }

    /// Connections to `server`, authenticated with its credentials.
    pub fn to(server: &Server, connect_timeout: Duration) -> Result<Self, UpstreamError> {
        Ok(Self::with_address(server.uri.clone(), &server.tls, connect_timeout)?
            .with_credentials(server.credentials.clone()))
    }

    fn with_address(uri: RedisUri, tls: &TlsSettings, connect_timeout: Duration) -> Result<Self, UpstreamError> {
        let addr: Arc<str> = uri.host_port().into();
        let tls = if uri.tls { Some(tls_connector(&uri, &addr, tls)?) } else { None };
        Ok(Upstream { uri, addr, tls, credentials: None, connect_timeout })
    }

    /// Authenticates every new connection with `credentials` before anything else.
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// Whether Eden authenticates connections itself (then the client's AUTH is not replayed).
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Opens a connection (TLS when the URI says so), authenticates when credentials are set,
    /// and selects the URI's database. On a password-protected server a database other than 0
    /// needs credentials: SELECT before AUTH is refused.
    pub async fn connect(&self) -> Result<UpstreamStream, UpstreamError> {
        let addr = self.addr.to_string();
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&*self.addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => return Err(UpstreamError::Unreachable { addr, source }),
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout: self.connect_timeout }),
        };
        tcp.set_nodelay(true).ok();
        let mut stream = match &self.tls {
            None => UpstreamStream::Tcp(tcp),
            Some((connector, name)) => {
                let handshake = tokio::time::timeout(self.connect_timeout, connector.connect(name.clone(), tcp));
                match handshake.await {
                    Ok(Ok(tls)) => UpstreamStream::Tls(Box::new(tls)),
                    Ok(Err(err)) => return Err(UpstreamError::Tls { addr, reason: err.to_string() }),
                    Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout: self.connect_timeout }),
                }
            }
        };
        if let Some(credentials) = &self.credentials {
            let mut auth = vec!["AUTH"];
            auth.extend(credentials.username.as_deref());
            auth.push(&credentials.password);
            self.expect_ok(&mut stream, "AUTH", &auth).await?;
        }
        if self.uri.db != 0 {
            self.expect_ok(&mut stream, "SELECT", &["SELECT", &self.uri.db.to_string()]).await?;
        }
        Ok(stream)
    }

    /// Sends one command during connection set-up and requires `+OK`.
    async fn expect_ok(
        &self,
        stream: &mut UpstreamStream,
        command: &'static str,
        args: &[&str],
    ) -> Result<(), UpstreamError> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        let io_error = |source| UpstreamError::Unreachable { addr: self.addr.to_string(), source };
        stream.write_all(request.as_bytes()).await.map_err(io_error)?;
        let mut reply = Vec::with_capacity(64);
        while !reply.ends_with(b"\r\n") && reply.len() < 512 {
            if stream.read_buf(&mut reply).await.map_err(io_error)? == 0 {
                break;
            }
        }
        if reply != b"+OK\r\n" {
            let reply = String::from_utf8_lossy(&reply).trim().trim_start_matches('-').to_string();
            return Err(UpstreamError::Refused { addr: self.addr.to_string(), command, reply });
        }
        Ok(())
    }
}

fn tls_connector(
    uri: &RedisUri,
    addr: &str,
    settings: &TlsSettings,
) -> Result<(TlsConnector, ServerName<'static>), UpstreamError> {
    let error = |reason: String| UpstreamError::Tls { addr: addr.to_string(), reason };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(e.to_string()))?;
    let config = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &settings.ca_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots.add(cert.map_err(|e| error(format!("CA bundle: {e}")))?).map_err(|e| error(e.to_string()))?;
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let name = settings.server_name.clone().unwrap_or_else(|| uri.host.clone());
    let name = ServerName::try_from(name).map_err(|e| error(e.to_string()))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// For `insecureSkipVerify`: handshake signatures are still checked, the chain is not.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_with_defaults_and_reject_what_is_not_redis() {
        assert_eq!(
            RedisUri::parse("redis://10.0.1.50").unwrap(),
            RedisUri { tls: false, host: "10.0.1.50".into(), port: 6379, db: 0 }
        );
        let tls = RedisUri::parse("rediss://cache.example.com:6380/3").unwrap();
        assert_eq!((tls.tls, tls.host_port(), tls.db), (true, "cache.example.com:6380".to_string(), 3));
        for bad in ["http://example.com", "redis://", "redis://host:port", "redis://host:1/x", "redis://user:pw@host:1"]
        {
            assert!(RedisUri::parse(bad).is_err(), "{bad}");
        }
        let v6 = RedisUri::parse("redis://[::1]:7000/2").unwrap();
        assert_eq!((v6.host.as_str(), v6.host_port(), v6.db), ("::1", "[::1]:7000".to_string(), 2));
    }

    /// Every character a password may hold, percent-encoded in the URI, arrives decoded; the
    /// password appears in no error and no Debug output.
    #[test]
    fn credentials_come_out_of_the_uri_decoded_and_stay_out_of_messages() {
        let password = "p@ss:w/rd %#+=?ü✓";
        let encoded: String =
            percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC).collect();
        let user = "app user@ü";
        let user_encoded: String =
            percent_encoding::utf8_percent_encode(user, percent_encoding::NON_ALPHANUMERIC).collect();
        let server =
            Server::parse(&format!("rediss://{user_encoded}:{encoded}@[2001:db8::5]:6380/4"), TlsSettings::default())
                .unwrap();
        let credentials = server.credentials.clone().unwrap();
        assert_eq!((credentials.username.as_deref(), credentials.password.as_str()), (Some(user), password));
        assert_eq!((server.addr(), server.uri.db, server.uri.tls), ("[2001:db8::5]:6380".to_string(), 4, true));
        assert!(!format!("{server:?}").contains("p@ss"), "{server:?}");
        // Azure access keys are base64: `+`, `/` and `=` percent-encoded; `+` is not a space.
        let azure = Server::parse("redis://:ab%2Bc%2Fd%3D@cache:6380", TlsSettings::default()).unwrap();
        assert_eq!(azure.credentials.unwrap().password, "ab+c/d=");
        let bare = Server::parse("redis://s3cret@cache", TlsSettings::default()).unwrap();
        assert_eq!(bare.credentials, Some(Credentials { username: None, password: "s3cret".into() }));
        assert_eq!(Server::parse("redis://cache", TlsSettings::default()).unwrap().credentials, None);

        for leaky in
            ["redis://:pa#ss@cache:1", "redis://:pa?ss@cache:1", "redis://u:pa/ss@cache:1/x", "redis://:pa@ss@h:x"]
        {
            let err = Server::parse(leaky, TlsSettings::default()).err().unwrap().to_string();
            assert!(!err.contains("pa") && err.contains("<credentials>"), "{leaky}: {err}");
        }
        let err = RedisUri::parse("redis://u:hunter2@cache:1").err().unwrap().to_string();
        assert!(!err.contains("hunter2") && err.contains("Secret"), "{err}");
    }
}
