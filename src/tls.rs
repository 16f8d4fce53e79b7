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

fn private_key(key_name: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|e| TlsError::Read {
        key: key_name,
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Read {
            key: key_name,
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .ok_or(TlsError::Empty {
            key: key_name,
            path: path.display().to_string(),
            what: "private key",
        })
}

fn roots(key: &'static str, ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(key, ca)? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(roots)
}

/// Client certificates on the listener (mTLS): the CAs that sign them, and whether a client
/// without one may connect.
pub struct ClientCerts<'a> {
    pub ca: &'a Path,
    pub required: bool,
}

pub fn acceptor(
    cert: &Path,
    key: &Path,
    clients: Option<ClientCerts<'_>>,
) -> Result<TlsAcceptor, TlsError> {
    server_config(
        ("listener.tls.cert", "listener.tls.key"),
        cert,
        key,
        clients,
    )
    .map(TlsAcceptor::from)
}

/// The admin API's HTTPS acceptor (`[admin.tls]`; no client certificates).
pub fn admin_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    server_config(("admin.tls.cert", "admin.tls.key"), cert, key, None).map(TlsAcceptor::from)
}

fn server_config(
    (cert_key, key_key): (&'static str, &'static str),
    cert: &Path,
    key: &Path,
    clients: Option<ClientCerts<'_>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(cert_key, cert)?;
    let private = private_key(key_key, key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let roots = Arc::new(roots("listener.tls.client_ca", c.ca)?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if c.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        }
    };
    let config = builder
        .with_single_cert(chain, private)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A connector trusting `ca`, presenting `identity` (certificate chain, key) when given.
pub fn connector(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<TlsConnector, TlsError> {
    client_config("upstream.tls.ca", ca, identity).map(TlsConnector::from)
}

/// A client configuration trusting the CAs in `ca` (`key`: the setting named in errors).
pub fn client_config(
    key: &'static str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(key, ca)?);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certs("upstream.tls.cert", cert)?,
                private_key("upstream.tls.key", key)?,
            )
            .map_err(|e| TlsError::Config(e.to_string()))?,
    };
    Ok(Arc::new(config))
}

/// The principal name a client certificate carries: its subject as Java's
/// `X500Principal.getName()` writes it (RFC 2253, the most specific part first:
/// "CN=app,OU=eng,O=Acme"; keywords only for CN, C, L, ST, O, OU, STREET, DC and UID, other
/// attributes as `OID=#<DER hex>`), so Kafka's ACL principals carry over; or its common name
/// alone. None when the certificate cannot be read, has no CN, or holds a value that cannot be
/// decoded (two certificates must never share a principal by accident).
pub fn certificate_principal(der: &[u8], common_name_only: bool) -> Option<String> {
    use x509_parser::asn1_rs::ToDer;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    if common_name_only {
        return subject.iter_common_name().next().and_then(attribute_text);
    }
    let mut rdns = Vec::new();
    for rdn in subject.iter_rdn() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let keyword = match oid.as_str() {
                "2.5.4.3" => Some("CN"),
                "2.5.4.6" => Some("C"),
                "2.5.4.7" => Some("L"),
                "2.5.4.8" => Some("ST"),
                "2.5.4.10" => Some("O"),
                "2.5.4.11" => Some("OU"),
                "2.5.4.9" => Some("STREET"),
                "0.9.2342.19200300.100.1.25" => Some("DC"),
                "0.9.2342.19200300.100.1.1" => Some("UID"),
                _ => None,
            };
            parts.push(match keyword {
                Some(k) => format!("{k}={}", escape_dn_value(&attribute_text(attr)?)),
                None => {
                    let der = attr.attr_value().to_der_vec().ok()?;
                    let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
                    format!("{oid}=#{hex}")
                }
            });
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    (!rdns.is_empty()).then(|| rdns.join(","))
}

/// An attribute's string value, whichever ASN.1 string type holds it.
fn attribute_text(attr: &x509_parser::x509::AttributeTypeAndValue<'_>) -> Option<String> {
    use x509_parser::asn1_rs::Tag;
    let value = attr.attr_value();
    let data = value.data;
    match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => std::str::from_utf8(data).ok().map(str::to_string),
        // Java reads a T61String as ISO-8859-1.
        Tag::T61String => Some(data.iter().map(|b| *b as char).collect()),
        Tag::BmpString => {
            let units: Vec<u16> = data
                .chunks(2)
                .map(|c| (c.len() == 2).then(|| u16::from_be_bytes([c[0], c[1]])))
                .collect::<Option<_>>()?;
            String::from_utf16(&units).ok()
        }
        Tag::UniversalString => data
            .chunks(4)
            .map(|c| {
                (c.len() == 4)
                    .then(|| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .and_then(char::from_u32)
            })
            .collect(),
        _ => None,
    }
}

/// RFC 2253 escaping of an attribute value.
fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    /// `openssl req -x509 -subj "/C=US/O=Acme, Inc./OU=eng/CN=dave"` (EC P-256).
    const DAVE: &str = "-----BEGIN CERTIFICATE-----\nMIIB1DCCAXugAwIBAgIUQJ6kqS0Syrt5I3tOQ5R/Trfl2ygwCgYIKoZIzj0EAwIw\nPzELMAkGA1UEBhMCVVMxEzARBgNVBAoMCkFjbWUsIEluYy4xDDAKBgNVBAsMA2Vu\nZzENMAsGA1UEAwwEZGF2ZTAgFw0yNjEyMDExOTIzNTZaGA8yMTI2MTEwNzE5MjM1\nNlowPzELMAkGA1UEBhMCVVMxEzARBgNVBAoMCkFjbWUsIEluYy4xDDAKBgNVBAsM\nA2VuZzENMAsGA1UEAwwEZGF2ZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABLg/\nxeNvh3iCc1kJ+XFiSxkzBNVI5nY74vHuw2Ls+UXh5qcekHMdJAEPibfdDfzeOF/M\ngXzVyJCm8n//ljXE2YejUzBRMB0GA1UdDgQWBBRMzajphAEcYxyG1G4pM6pY+S4I\n2zAfBgNVHSMEGDAWgBRMzajphAEcYxyG1G4pM6pY+S4I2zAPBgNVHRMBAf8EBTAD\nAQH/MAoGCCqGSM49BAMCA0cAMEQCIG6diX9H7U2doW+vzlFxaySSV8sLedR4RBnP\ngzKDuQpEAiAR58Aq04I+iVUcHNyJlZXUjN0n3dmuBzUj24XDH4cWSw==\n-----END CERTIFICATE-----";

    #[test]
    fn a_certificate_names_its_principal_as_kafka_does() {
        let der = rustls_pemfile::certs(&mut DAVE.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        // `openssl x509 -subject -nameopt RFC2253` and Java's X500Principal agree on this.
        assert_eq!(
            super::certificate_principal(der.as_ref(), false).as_deref(),
            Some("CN=dave,OU=eng,O=Acme\\, Inc.,C=US")
        );
        assert_eq!(
            super::certificate_principal(der.as_ref(), true).as_deref(),
            Some("dave")
        );
        assert_eq!(
            super::certificate_principal(b"not a certificate", false),
            None
        );
    }
}
