//! Everything needed to open a connection to an Endpoint, with its Secrets read.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::crd::EndpointSpec;

/// An Endpoint's address, credentials and TLS material, resolved from its Secrets.
#[derive(Clone, Default, PartialEq)]
pub struct ConnectionSettings {
    pub uri: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_pem: Option<Vec<u8>>,
    pub server_name: Option<String>,
    pub insecure_skip_verify: bool,
}

// Never print credentials, even in debug logs.
impl std::fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("uri", &self.uri)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| pem.len()))
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
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
            settings.password = Some(text(&secret, &reference.name, "password")?);
            settings.username = text(&secret, &reference.name, "username").ok();
        }
        if let Some(tls) = &spec.tls {
            settings.server_name = tls.server_name.clone();
            settings.insecure_skip_verify = tls.insecure_skip_verify;
            if let Some(reference) = &tls.ca_secret_ref {
                let secret = read(secrets, &reference.name).await?;
                settings.ca_pem = Some(bytes(&secret, &reference.name, "ca.crt")?.to_vec());
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
