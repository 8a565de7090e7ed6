//! The webhook's TLS: the API server only calls webhooks over HTTPS, trusting the `caBundle` of
//! their configuration.
//!
//! The operator keeps its own CA in a Secret, created by whichever replica starts first, so every
//! replica serves a certificate the same `caBundle` trusts. Each replica signs its own serving
//! certificate with the CA's key, as an issuer rebuilt from the CA's subject and key, so there
//! is no certificate to parse; the Secret records each CA's expiry beside it.
//!
//! Both rotate ([`Lifetimes`]). A CA with less than a third of its lifetime left is replaced in
//! the Secret by the first replica to notice (the others, losing the write, read the winner's),
//! and the replaced one stays in the `caBundle` until it expires, so certificates it signed stay
//! trusted. A replica serves a certificate from the new CA only once the configuration it has
//! just written trusts that CA; it renews its own certificate the same way when a third of its
//! lifetime is left. [`ServingCertificate`] swaps the certificate under a running listener.
//!
//! Or another issuer keeps the certificate (cert-manager, through its Secret mounted in the
//! pod: [`Certificates::Mounted`]): the operator serves the files and writes their `ca.crt` as
//! the `caBundle`, and reads them again at every check, since the issuer renews them in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use time::OffsetDateTime;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring::{default_provider, sign};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::WebhookError;

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
/// When the CA expires, in seconds since the Unix epoch.
const CA_NOT_AFTER: &str = "ca.not-after";
/// Which CA this is, counting from 1: part of its subject, so that two CAs in the bundle never
/// share a name.
const CA_GENERATION: &str = "ca.generation";
const PREVIOUS_CERT: &str = "previous-ca.crt";
const PREVIOUS_NOT_AFTER: &str = "previous-ca.not-after";
const CA_SUBJECT: &str = "eden-operator webhook CA";
/// Certificates start this long before they are made: clocks of replicas and API servers differ.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum Certificates {
    /// The operator's own CA, in a Secret; both rotate.
    Managed(Lifetimes),
    /// Files another issuer keeps current (cert-manager's Secret, mounted): `tls.crt` (the
    /// chain), `tls.key`, and `ca.crt` (the `caBundle`), read again every `check_every`.
    Mounted { dir: PathBuf, check_every: Duration },
}

impl Certificates {
    pub fn check_every(&self) -> Duration {
        match self {
            Certificates::Managed(lifetimes) => lifetimes.check_every,
            Certificates::Mounted { check_every, .. } => *check_every,
        }
    }
}

/// How long certificates live, and how often each replica checks whether one is due.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub ca: Duration,
    pub serving: Duration,
    pub check_every: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        const DAY: Duration = Duration::from_secs(24 * 60 * 60);
        Lifetimes { ca: 365 * DAY, serving: 30 * DAY, check_every: Duration::from_secs(60 * 60) }
    }
}

/// Whether a certificate of `lifetime` that expires at `not_after` has less than a third of it
/// left.
fn due(not_after: SystemTime, lifetime: Duration) -> bool {
    not_after.duration_since(SystemTime::now()).unwrap_or_default() < lifetime / 3
}

/// The CA, as the Secret holds it.
pub struct Authority {
    generation: u64,
    cert_pem: String,
    key: KeyPair,
    not_after: SystemTime,
    /// The CA this one replaced, trusted until it expires.
    previous: Option<(String, SystemTime)>,
}

impl Authority {
    /// The CA in Secret `name`: created when no replica has made one, replaced when it is due.
    pub async fn current(secrets: &Api<Secret>, name: &str, lifetimes: &Lifetimes) -> Result<Self, WebhookError> {
        let Some(secret) = secrets.get_opt(name).await? else {
            let authority = Self::generate(1, lifetimes.ca, None)?;
            let secret = Secret {
                metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
                type_: Some("Opaque".into()),
                data: Some(authority.data()),
                ..Default::default()
            };
            return match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => Ok(authority),
                // Another replica created it meanwhile: use theirs.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    Self::from_secret(&secrets.get(name).await?, name)
                }
                Err(err) => Err(err.into()),
            };
        };
        let stored = Self::from_secret(&secret, name)?;
        if !due(stored.not_after, lifetimes.ca) {
            return Ok(stored);
        }
        let previous = Some((stored.cert_pem, stored.not_after));
        let authority = Self::generate(stored.generation + 1, lifetimes.ca, previous)?;
        // The read's resourceVersion makes this a compare-and-swap: of replicas rotating at
        // once, one wins and the others read its CA.
        let replaced = Secret { data: Some(authority.data()), ..secret };
        match secrets.replace(name, &PostParams::default(), &replaced).await {
            Ok(_) => {
                tracing::info!(generation = authority.generation, "webhook CA rotated");
                Ok(authority)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Self::from_secret(&secrets.get(name).await?, name),
            Err(err) => Err(err.into()),
        }
    }

    fn generate(
        generation: u64,
        lifetime: Duration,
        previous: Option<(String, SystemTime)>,
    ) -> Result<Self, WebhookError> {
        let key = KeyPair::generate()?;
        let not_after = SystemTime::now() + lifetime;
        let mut params = ca_params(generation)?;
        (params.not_before, params.not_after) = validity(not_after)?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Authority { generation, cert_pem, key, not_after: round_down(not_after), previous })
    }

    fn data(&self) -> BTreeMap<String, ByteString> {
        let text = |value: &str| ByteString(value.as_bytes().to_vec());
        let mut data = BTreeMap::from([
            (CA_CERT.to_string(), text(&self.cert_pem)),
            (CA_KEY.to_string(), text(&self.key.serialize_pem())),
            (CA_NOT_AFTER.to_string(), text(&unix_seconds(self.not_after).to_string())),
            (CA_GENERATION.to_string(), text(&self.generation.to_string())),
        ]);
        if let Some((cert, not_after)) = &self.previous {
            data.insert(PREVIOUS_CERT.into(), text(cert));
            data.insert(PREVIOUS_NOT_AFTER.into(), text(&unix_seconds(*not_after).to_string()));
        }
        data
    }

    fn from_secret(secret: &Secret, name: &str) -> Result<Self, WebhookError> {
        let data = secret.data.as_ref();
        let field =
            |key: &str| data.and_then(|data| data.get(key)).and_then(|bytes| String::from_utf8(bytes.0.clone()).ok());
        let required = |key: &str| {
            field(key).ok_or_else(|| {
                WebhookError::Tls(format!("Secret {name} has no readable {key}; delete it to have a new CA made"))
            })
        };
        let number = |key: &str| -> Result<u64, WebhookError> {
            required(key)?.trim().parse().map_err(|err| {
                WebhookError::Tls(format!(
                    "Secret {name}: {key} is not a number: {err}; delete it to have a new CA made"
                ))
            })
        };
        let time = |key: &str| number(key).map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds));
        let previous = match field(PREVIOUS_CERT) {
            Some(cert) => Some((cert, time(PREVIOUS_NOT_AFTER)?)),
            None => None,
        };
        Ok(Authority {
            generation: number(CA_GENERATION)?,
            cert_pem: required(CA_CERT)?,
            key: KeyPair::from_pem(&required(CA_KEY)?)?,
            not_after: time(CA_NOT_AFTER)?,
            previous,
        })
    }

    /// The PEM the webhook configuration's `caBundle` carries: this CA, and the one it replaced
    /// while that one has not expired.
    pub fn bundle(&self) -> String {
        match &self.previous {
            Some((previous, not_after)) if *not_after > SystemTime::now() => format!("{}{previous}", self.cert_pem),
            _ => self.cert_pem.clone(),
        }
    }

    /// This CA's certificate (PEM).
    pub fn certificate(&self) -> &str {
        &self.cert_pem
    }

    /// A fresh key and a certificate for `names` (DNS names or IP addresses) signed by this CA,
    /// valid for `lifetime` or until the CA expires, whichever comes first.
    pub fn sign(&self, names: &[String], lifetime: Duration) -> Result<Issued, WebhookError> {
        let issuer = Issuer::new(ca_params(self.generation)?, &self.key);
        let key = KeyPair::generate()?;
        let not_after = (SystemTime::now() + lifetime).min(self.not_after);
        let mut params = CertificateParams::new(names.to_vec())?;
        (params.not_before, params.not_after) = validity(not_after)?;
        let cert = params.signed_by(&key, &issuer)?;
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
            .map_err(|err| WebhookError::Tls(format!("the serving key: {err}")))?;
        let signing_key =
            sign::any_supported_type(&key).map_err(|err| WebhookError::Tls(format!("the serving key: {err}")))?;
        let certified = CertifiedKey::new(vec![CertificateDer::from(cert.der().to_vec())], signing_key);
        Ok(Issued { certified: Arc::new(certified), ca_generation: self.generation, not_after: round_down(not_after) })
    }
}

/// A serving certificate and what decides when it is renewed.
pub struct Issued {
    certified: Arc<CertifiedKey>,
    ca_generation: u64,
    not_after: SystemTime,
}

impl Issued {
    pub fn certified(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// Whether it should give way to one signed by `authority`: another CA signed it, or a
    /// third of its `lifetime` is left.
    pub fn due(&self, authority: &Authority, lifetime: Duration) -> bool {
        self.ca_generation != authority.generation || due(self.not_after, lifetime)
    }
}

/// A certificate read from a [`Certificates::Mounted`] directory.
pub struct Mounted {
    certified: Arc<CertifiedKey>,
    bundle: String,
    /// The files' text, to tell when the issuer has renewed them.
    files: String,
}

impl Mounted {
    pub fn read(dir: &Path) -> Result<Self, WebhookError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|err| WebhookError::Tls(format!("{}: {err}", path.display())))
        };
        let (chain_pem, key_pem, bundle) = (read("tls.crt")?, read("tls.key")?, read("ca.crt")?);
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| WebhookError::Tls(format!("{}/tls.crt: {err}", dir.display())))?;
        if chain.is_empty() || !bundle.contains("-----BEGIN CERTIFICATE-----") {
            return Err(WebhookError::Tls(format!("{}: tls.crt and ca.crt must hold certificates", dir.display())));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| WebhookError::Tls(format!("{}/tls.key: {err}", dir.display())))?;
        let signing_key = sign::any_supported_type(&key)
            .map_err(|err| WebhookError::Tls(format!("{}/tls.key: {err}", dir.display())))?;
        let certified = CertifiedKey::new(chain, signing_key);
        // A certificate and a key from two different renewals (files written one by one).
        certified
            .keys_match()
            .map_err(|err| WebhookError::Tls(format!("{}: tls.key does not go with tls.crt: {err}", dir.display())))?;
        let files = format!("{chain_pem}{key_pem}{bundle}");
        Ok(Mounted { certified: Arc::new(certified), bundle, files })
    }

    pub fn certified(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// The `caBundle`: the directory's `ca.crt`.
    pub fn bundle(&self) -> &str {
        &self.bundle
    }

    /// Whether `other` was read from the same files.
    pub fn same_as(&self, other: &Mounted) -> bool {
        self.files == other.files
    }
}

/// The certificate a listener serves, swapped in place when renewed: connections made after
/// the swap get the new one.
#[derive(Debug)]
pub struct ServingCertificate(RwLock<Arc<CertifiedKey>>);

impl ServingCertificate {
    pub fn new(certified: &Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(ServingCertificate(RwLock::new(certified.clone())))
    }

    pub fn replace(&self, certified: &Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = certified.clone();
    }

    /// A server configuration that serves whatever this holds.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, WebhookError> {
        let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| WebhookError::Tls(format!("TLS versions: {err}")))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// The CA's parameters: the same for a generation every time, so that a CA read back from its
/// Secret signs certificates whose issuer is the stored certificate's subject.
fn ca_params(generation: u64) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, format!("{CA_SUBJECT} {generation}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// From a little before now until `not_after`.
fn validity(not_after: SystemTime) -> Result<(OffsetDateTime, OffsetDateTime), WebhookError> {
    let at = |time: SystemTime| {
        OffsetDateTime::from_unix_timestamp(unix_seconds(time) as i64)
            .map_err(|err| WebhookError::Tls(format!("certificate validity: {err}")))
    };
    Ok((at(SystemTime::now() - CLOCK_SKEW)?, at(not_after)?))
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Certificates count in whole seconds.
fn round_down(time: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds(time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_due_with_a_third_of_its_lifetime_left() {
        let lifetime = Duration::from_secs(300);
        assert!(!due(SystemTime::now() + Duration::from_secs(150), lifetime));
        assert!(due(SystemTime::now() + Duration::from_secs(90), lifetime));
        assert!(due(SystemTime::now() - Duration::from_secs(1), lifetime), "expired");
    }

    #[test]
    fn a_serving_certificate_is_renewed_for_time_or_a_new_ca_and_never_outlives_its_ca() {
        let hour = Duration::from_secs(3600);
        let authority = Authority::generate(1, 10 * hour, None).unwrap();
        let issued = authority.sign(&["eden.test".into()], hour).unwrap();
        assert!(!issued.due(&authority, hour), "signed by this CA, time left");
        let next = Authority::generate(2, 10 * hour, None).unwrap();
        assert!(issued.due(&next, hour), "another CA");

        let ending = Authority::generate(1, Duration::from_secs(60), None).unwrap();
        assert_eq!(ending.sign(&["eden.test".into()], hour).unwrap().not_after, ending.not_after);
    }

    #[test]
    fn the_bundle_keeps_the_replaced_ca_until_it_expires() {
        let old = Authority::generate(1, Duration::from_secs(60), None).unwrap();
        let new = Authority::generate(2, Duration::from_secs(60), Some((old.cert_pem.clone(), old.not_after))).unwrap();
        assert_eq!(new.bundle(), format!("{}{}", new.cert_pem, old.cert_pem));
        let expired = Some((old.cert_pem.clone(), SystemTime::now() - Duration::from_secs(1)));
        let later = Authority::generate(2, Duration::from_secs(60), expired).unwrap();
        assert_eq!(later.bundle(), later.cert_pem);
    }
}
