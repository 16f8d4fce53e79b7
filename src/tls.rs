//! TLS setup from PEM files (rustls with the ring provider).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {message}")]
    Read {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("{key}: {path} contains no {what}")]
    Empty {
        key: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|e| TlsError::Read {
        key,
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            key,
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.display().to_string(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = certs("listener.tls.cert", cert)?;
    let data = std::fs::read(key).map_err(|e| TlsError::Read {
        key: "listener.tls.key",
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    let private: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Read {
            key: "listener.tls.key",
            path: key.display().to_string(),
            message: e.to_string(),
        })?
        .ok_or(TlsError::Empty {
            key: "listener.tls.key",
            path: key.display().to_string(),
            what: "private key",
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub fn connector(ca: &Path) -> Result<TlsConnector, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("upstream.tls.ca", ca)? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
