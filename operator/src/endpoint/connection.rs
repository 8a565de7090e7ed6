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

    /// The URI with the credentials written into it, for clients that take only a URL (the
    /// replication engine). It holds the password: never log it.
    pub fn url_with_credentials(&self) -> Result<String, InvalidUri> {
        let mut url = url::Url::parse(&self.uri).map_err(|err| InvalidUri(format!("{}: {err}", self.uri)))?;
        if let Some(credentials) = &self.credentials {
            // `set_*` fail only for URLs that cannot have credentials, which `parse` of a
            // redis:// URI with a host never yields.
            let username = credentials.username.as_deref().unwrap_or("");
            url.set_username(username).map_err(|()| InvalidUri(format!("{}: cannot hold a username", self.uri)))?;
            url.set_password(Some(&credentials.password))
                .map_err(|()| InvalidUri(format!("{}: cannot hold a password", self.uri)))?;
        }
        Ok(url.into())
    }
}

/// An Endpoint URI the replication engine cannot use.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URI {0}")]
pub struct InvalidUri(String);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_written_into_the_url_escaped() {
        let settings = ConnectionSettings {
            uri: "redis://10.0.0.5:6379/2".into(),
            credentials: Some(Credentials { username: Some("app".into()), password: "p@ss:w/rd".into() }),
            ..Default::default()
        };
        assert_eq!(settings.url_with_credentials().unwrap(), "redis://app:p%40ss%3Aw%2Frd@10.0.0.5:6379/2");
        let anonymous = ConnectionSettings { uri: "redis://10.0.0.5:6379".into(), ..Default::default() };
        assert_eq!(anonymous.url_with_credentials().unwrap(), "redis://10.0.0.5:6379");
    }
}
