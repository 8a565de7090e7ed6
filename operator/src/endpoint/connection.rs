//! An Endpoint as the [`Server`] every connection to it is made from, with its Secrets read.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use eden_sidecar::upstream::{Credentials, Server, TlsSettings, UpstreamError};

use crate::crd::EndpointSpec;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("Secret {name} could not be read: {source}")]
    Read { name: String, source: kube::Error },
    #[error("Secret {name} has no key {key:?}")]
    MissingKey { name: String, key: &'static str },
    #[error("Secret {name} key {key:?} is not UTF-8")]
    NotUtf8 { name: String, key: &'static str },
    #[error(transparent)]
    Uri(#[from] UpstreamError),
}

/// The server `spec` describes, with its Secrets read from `secrets` (the Endpoint's
/// namespace): its address, its credentials (the Secret's, else any in the URI) and its own TLS
/// settings, kept apart, so no password is ever written into a URL string.
pub async fn resolve(spec: &EndpointSpec, secrets: &Api<Secret>) -> Result<Server, CredentialsError> {
    let mut tls = TlsSettings::default();
    if let Some(spec) = &spec.tls {
        tls.server_name = spec.server_name.clone();
        tls.insecure_skip_verify = spec.insecure_skip_verify;
        if let Some(reference) = &spec.ca_secret_ref {
            let secret = read(secrets, &reference.name).await?;
            tls.ca_pem = Some(bytes(&secret, &reference.name, "ca.crt")?.to_vec());
        }
    }
    let mut credentials = None;
    if let Some(reference) = &spec.credentials_secret_ref {
        let secret = read(secrets, &reference.name).await?;
        credentials = Some(credentials_in(&secret, &reference.name)?);
    }
    Ok(Server::parse(&spec.uri, tls)?.with_credentials(credentials))
}

/// The `username` (optional) and `password` of a credentials Secret, as stored: any UTF-8.
fn credentials_in(secret: &Secret, name: &str) -> Result<Credentials, CredentialsError> {
    Ok(Credentials { username: text(secret, name, "username").ok(), password: text(secret, name, "password")? })
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    /// A Secret's password and username reach the server as they are, whatever they hold; they
    /// replace credentials in the URI, and nothing prints them.
    #[test]
    fn secret_credentials_are_taken_as_they_are() {
        let password = "p@ss:w/rd %#+=?ü✓";
        let secret = Secret {
            data: Some(
                [("password", password), ("username", "app user:ü")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        let credentials = credentials_in(&secret, "creds").unwrap();
        assert_eq!((credentials.username.as_deref(), credentials.password.as_str()), (Some("app user:ü"), password));
        let server = Server::parse("redis://:from-uri@10.0.0.5:6379/2", TlsSettings::default())
            .unwrap()
            .with_credentials(Some(credentials.clone()));
        assert_eq!(server.credentials, Some(credentials));
        assert!(!format!("{server:?}").contains("p@ss"), "{server:?}");
        let missing = credentials_in(&Secret::default(), "creds").err().unwrap();
        assert!(matches!(missing, CredentialsError::MissingKey { key: "password", .. }));
    }
}
