//! The webhook's TLS: the API server only calls webhooks over HTTPS, trusting the `caBundle` of
//! their configuration.
//!
//! The operator keeps its own CA in a Secret, created by whichever replica starts first, so every
//! replica serves a certificate the same `caBundle` trusts. Each replica signs its serving
//! certificate at start with the CA's key, as an issuer rebuilt from the same subject and key, so
//! there is no certificate to parse. Rotation is not automatic yet: deleting the Secret and
//! restarting the operator makes a new CA.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::WebhookError;

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const CA_SUBJECT: &str = "eden-operator webhook CA";

/// The CA: its certificate (the `caBundle`) and what signs serving certificates.
pub struct Authority {
    cert_pem: String,
    key: KeyPair,
}

impl Authority {
    /// Reads the CA from Secret `name`, creating it first if no replica has.
    pub async fn load_or_create(secrets: &Api<Secret>, name: &str) -> Result<Self, WebhookError> {
        if let Some(secret) = secrets.get_opt(name).await? {
            return Self::from_secret(&secret, name);
        }
        let key = KeyPair::generate()?;
        let cert_pem = ca_params()?.self_signed(&key)?.pem();
        let secret = Secret {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (CA_CERT.to_string(), ByteString(cert_pem.clone().into_bytes())),
                (CA_KEY.to_string(), ByteString(key.serialize_pem().into_bytes())),
            ])),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(Authority { cert_pem, key }),
            // Another replica created it meanwhile: use theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => Self::from_secret(&secrets.get(name).await?, name),
            Err(err) => Err(err.into()),
        }
    }

    fn from_secret(secret: &Secret, name: &str) -> Result<Self, WebhookError> {
        let field = |key: &str| {
            let bytes = secret.data.as_ref().and_then(|data| data.get(key));
            bytes.and_then(|bytes| String::from_utf8(bytes.0.clone()).ok()).ok_or_else(|| {
                WebhookError::Tls(format!("Secret {name} has no readable {key}; delete it to have a new CA made"))
            })
        };
        Ok(Authority { cert_pem: field(CA_CERT)?, key: KeyPair::from_pem(&field(CA_KEY)?)? })
    }

    /// The PEM the webhook configuration's `caBundle` carries.
    pub fn bundle(&self) -> &str {
        &self.cert_pem
    }

    /// A server configuration with a fresh key and a certificate for `names` (DNS names or IP
    /// addresses) signed by this CA.
    pub fn server_config(&self, names: &[String]) -> Result<Arc<ServerConfig>, WebhookError> {
        let issuer = Issuer::new(ca_params()?, &self.key);
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(names.to_vec())?.signed_by(&key, &issuer)?;
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
            .map_err(|err| WebhookError::Tls(format!("the serving key: {err}")))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| WebhookError::Tls(format!("TLS versions: {err}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|err| WebhookError::Tls(format!("the serving certificate: {err}")))?;
        Ok(Arc::new(config))
    }
}

/// The CA's parameters: the same every time, so that a CA read back from its Secret signs
/// certificates whose issuer is the stored certificate's subject.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_SUBJECT);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}
