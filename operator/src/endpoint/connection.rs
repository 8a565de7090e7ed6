//! Everything needed to open a connection to an Endpoint, with its Secrets read.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use eden_sidecar::upstream::{Credentials, TlsSettings};

use crate::crd::EndpointSpec;

/// An Endpoint's address, credentials and TLS material, resolved from its Secrets: what the
/// data plane's [`Upstream`](eden_sidecar::upstream::Upstream) needs to connect.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionSettings {
    pub uri: String,
    pub credentials: Option<Credentials>,
    pub tls: TlsSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("Secret {name} could not be read: {source}")]
    Read { name: String, source: kube::Error },
    #[error("Secret {name} has no key {key:?}")]
    MissingKey { name: String, key: &'static str },
    #[error("Secret {name} key {key:?} is not UTF-8")]
    NotUtf8 { name: String, key: &'static str },
}

impl ConnectionSettings {
    /// Reads the Secrets `spec` names from `secrets` (the Endpoint's namespace).
    pub async fn resolve(spec: &EndpointSpec, secrets: &Api<Secret>) -> Result<Self, CredentialsError> {
        let mut settings = ConnectionSettings { uri: spec.uri.clone(), ..Default::default() };
        if let Some(reference) = &spec.credentials_secret_ref {
            let secret = read(secrets, &reference.name).await?;
            settings.credentials = Some(Credentials {
                username: text(&secret, &reference.name, "username").ok(),
                password: text(&secret, &reference.name, "password")?,
            });
        }
        if let Some(tls) = &spec.tls {
            settings.tls.server_name = tls.server_name.clone();
            settings.tls.insecure_skip_verify = tls.insecure_skip_verify;
            if let Some(reference) = &tls.ca_secret_ref {
                let secret = read(secrets, &reference.name).await?;
                settings.tls.ca_pem = Some(bytes(&secret, &reference.name, "ca.crt")?.to_vec());
            }
        }
        Ok(settings)
    }
}

async fn read(secrets: &Api<Secret>, name: &str) -> Result<Secret, CredentialsError> {
    secrets.get(name).await.map_err(|source| CredentialsError::Read { name: name.to_string(), source })
}

fn bytes<'a>(secret: &'a Secret, name: &str, key: &'static str) -> Result<&'a [u8], CredentialsError> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|value| value.0.as_slice())
        .ok_or_else(|| CredentialsError::MissingKey { name: name.to_string(), key })
}

fn text(secret: &Secret, name: &str, key: &'static str) -> Result<String, CredentialsError> {
    let value = bytes(secret, name, key)?;
    String::from_utf8(value.to_vec()).map_err(|_| CredentialsError::NotUtf8 { name: name.to_string(), key })
}
