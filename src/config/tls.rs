//! `[listener.tls]` (TLS for clients, optionally with client certificates as principals) and
//! `[upstream.tls]` (TLS to the brokers, optionally with shardgate's own certificate).

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM file with the CAs that sign client certificates: clients then present one (mTLS)
    /// and, on a listener without SASL, its subject is their principal.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: "required" (default; no certificate, no connection) or "requested"
    /// (a client without one is User:ANONYMOUS).
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// How a certificate names its principal: "dn" (Kafka's default: "User:CN=app,O=Acme",
    /// RFC 2253) or "cn" ("User:app").
    #[serde(default)]
    pub principal: PrincipalFrom,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Required,
    Requested,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalFrom {
    #[default]
    Dn,
    Cn,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClientConfig {
    /// PEM file with the CA certificates that sign the brokers' certificates.
    pub ca: PathBuf,
    /// Name to verify in the brokers' certificates; defaults to each broker's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// shardgate's own certificate chain and key (PEM), for brokers that require client
    /// certificates (mTLS; `ssl.client.auth=required`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn readable(key: &str, p: &std::path::Path, what: &str) -> Result<(), ConfigError> {
    if p.is_file() {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{} is not a readable file", p.display()),
            format!("point it at {what}"),
        ))
    }
}

impl TlsServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        readable("listener.tls.cert", &self.cert, "a PEM file")?;
        readable("listener.tls.key", &self.key, "a PEM file")?;
        if let Some(ca) = &self.client_ca {
            readable(
                "listener.tls.client_ca",
                ca,
                "a PEM file with the CAs of client certificates",
            )?;
        }
        Ok(())
    }
}

impl TlsClientConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        readable(
            "upstream.tls.ca",
            &self.ca,
            "a PEM file with the brokers' CA certificates",
        )?;
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                readable(
                    "upstream.tls.cert",
                    c,
                    "shardgate's certificate chain (PEM)",
                )?;
                readable("upstream.tls.key", k, "shardgate's private key (PEM)")
            }
            (None, None) => Ok(()),
            (Some(_), None) => Err(invalid(
                "upstream.tls.key",
                "is missing while upstream.tls.cert is set",
                "set both (shardgate's client certificate and its key) or neither",
            )),
            (None, Some(_)) => Err(invalid(
                "upstream.tls.cert",
                "is missing while upstream.tls.key is set",
                "set both (shardgate's client certificate and its key) or neither",
            )),
        }
    }
}
