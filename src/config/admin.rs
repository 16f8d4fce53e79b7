//! `[admin]`: the admin HTTP listener and who may use it (bearer tokens with roles).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_bind")]
    pub bind: String,
    /// Bearer tokens accepted by the admin API. None: the API is open, and only a loopback
    /// `bind` is accepted.
    #[serde(default)]
    pub tokens: Vec<AdminToken>,
    /// `/metrics` answers without a token (a Prometheus scrape); false: a read token is needed.
    #[serde(default = "default_public_metrics")]
    pub public_metrics: bool,
    /// The name of the operator token this instance presents when it forwards a request to
    /// the leader instance (its own credential, not the caller's).
    #[serde(default)]
    pub forward_with: Option<String>,
    /// HTTPS instead of HTTP (tokens then never cross the network in clear).
    #[serde(default)]
    pub tls: Option<AdminTlsConfig>,
}

/// `[admin.tls]`: the admin API's certificate, and whom to trust when forwarding to the
/// leader instance's admin API (which is then HTTPS as well).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTlsConfig {
    /// PEM certificate chain and key of this instance's admin API.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM file with the CAs that sign the instances' admin certificates (checked when this
    /// instance forwards to the leader). Default: `cert` itself (one self-signed certificate
    /// shared by all instances, or a chain ending in its CA).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// `[admin.tls]`, checked: files readable.
#[derive(Debug, Clone)]
pub struct AdminTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            bind: default_admin_bind(),
            tokens: Vec::new(),
            public_metrics: default_public_metrics(),
            forward_with: None,
            tls: None,
        }
    }
}

pub(super) fn default_admin_bind() -> String {
    "127.0.0.1:29100".to_string()
}

fn default_public_metrics() -> bool {
    true
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// Shown in logs (never the token).
    pub name: String,
    pub role: AdminRole,
    /// The token itself, or
    #[serde(default)]
    pub value: Option<String>,
    /// the environment variable holding it (keeps it out of the file).
    #[serde(default)]
    pub env: Option<String>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AdminToken({}, {:?}, env {:?})",
            self.name, self.role, self.env
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    /// GET requests: maps, load, consumers, metrics.
    Read,
    /// Everything: also creating managed topics, splits and merges.
    Operator,
}

/// A token with its secret read.
#[derive(Clone)]
pub struct ResolvedToken {
    pub name: String,
    pub role: AdminRole,
    pub secret: String,
}

impl std::fmt::Debug for ResolvedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResolvedToken({}, {:?})", self.name, self.role)
    }
}

/// Who may use the admin API, validated.
#[derive(Clone, Default)]
pub struct AdminAuth {
    pub tokens: Vec<ResolvedToken>,
    pub public_metrics: bool,
    /// The secret presented when forwarding to the leader.
    pub forward: Option<String>,
    /// HTTPS (None: plain HTTP).
    pub tls: Option<AdminTls>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AdminAuth({:?}, public_metrics {}, forwards with a token: {}, tls {:?})",
            self.tokens,
            self.public_metrics,
            self.forward.is_some(),
            self.tls
        )
    }
}

/// Shorter tokens are refused: a bearer token is the whole credential.
const MIN_TOKEN_LEN: usize = 16;

impl AdminConfig {
    pub(super) fn resolve(&self, bind: SocketAddr) -> Result<AdminAuth, ConfigError> {
        let mut tokens: Vec<ResolvedToken> = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let key = format!("admin.tokens[{i}]");
            if t.name.trim().is_empty() {
                return Err(invalid(
                    &format!("{key}.name"),
                    "is empty",
                    "name each token (the name appears in logs, the token never does)",
                ));
            }
            if tokens.iter().any(|x| x.name == t.name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("\"{}\" is used by two tokens", t.name),
                    "give each token a name of its own",
                ));
            }
            let secret = super::sasl::secret(("value", &t.value), ("env", &t.env), &key)?;
            let secret = secret.trim().to_string();
            if secret.len() < MIN_TOKEN_LEN || secret.chars().any(|c| c.is_whitespace()) {
                return Err(invalid(
                    &key,
                    format!(
                        "token \"{}\" is shorter than {MIN_TOKEN_LEN} characters or has spaces",
                        t.name
                    ),
                    "use a long random token, e.g. `openssl rand -hex 32`",
                ));
            }
            tokens.push(ResolvedToken {
                name: t.name.clone(),
                role: t.role,
                secret,
            });
        }
        if tokens.is_empty() && !bind.ip().is_loopback() {
            return Err(invalid(
                "admin.bind",
                format!(
                    "{bind} is reachable from other hosts and admin.tokens is empty: anyone could split, merge or adopt topics"
                ),
                "configure [[admin.tokens]], or bind the admin API to 127.0.0.1",
            ));
        }
        let forward = match &self.forward_with {
            None => None,
            Some(name) => match tokens.iter().find(|t| &t.name == name) {
                Some(t) if t.role == AdminRole::Operator => Some(t.secret.clone()),
                Some(_) => {
                    return Err(invalid(
                        "admin.forward_with",
                        format!("token \"{name}\" has the read role"),
                        "name an operator token: forwarded requests change shard maps",
                    ));
                }
                None => {
                    return Err(invalid(
                        "admin.forward_with",
                        format!("no token is named \"{name}\""),
                        "name one of the [[admin.tokens]]",
                    ));
                }
            },
        };
        let tls = match &self.tls {
            None => None,
            Some(t) => {
                let ca = t.ca.clone().unwrap_or_else(|| t.cert.clone());
                for (key, path) in [
                    ("admin.tls.cert", &t.cert),
                    ("admin.tls.key", &t.key),
                    ("admin.tls.ca", &ca),
                ] {
                    if !path.is_file() {
                        return Err(invalid(
                            key,
                            format!("{} is not a readable file", path.display()),
                            "point it at a PEM file",
                        ));
                    }
                }
                Some(AdminTls {
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                    ca,
                })
            }
        };
        Ok(AdminAuth {
            tokens,
            public_metrics: self.public_metrics,
            forward,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, parse};

    fn err(extra: &str) -> String {
        parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string()
    }

    #[test]
    fn tokens_are_checked_and_an_open_admin_api_stays_on_loopback() {
        let ok = parse(&format!(
            "{MINIMAL}\n[admin]\nbind = \"0.0.0.0:9100\"\nforward_with = \"ops\"\n[[admin.tokens]]\nname = \"ops\"\nrole = \"operator\"\nvalue = \"0123456789abcdef0123\"\n[[admin.tokens]]\nname = \"graf\"\nrole = \"read\"\nvalue = \"fedcba9876543210fedc\"\n"
        ))
        .unwrap();
        assert_eq!(ok.admin_auth.tokens.len(), 2);
        assert_eq!(
            ok.admin_auth.forward.as_deref(),
            Some("0123456789abcdef0123")
        );
        let e = err("\n[admin]\nbind = \"0.0.0.0:9100\"\n");
        assert!(
            e.contains("admin.bind") && e.contains("admin.tokens"),
            "{e}"
        );
        let e = err(
            "\n[admin]\n[[admin.tokens]]\nname = \"a\"\nrole = \"operator\"\nvalue = \"short\"\n",
        );
        assert!(e.contains("admin.tokens[0]") && e.contains("16"), "{e}");
        let e = err(
            "\n[admin]\n[[admin.tokens]]\nname = \"a\"\nrole = \"operator\"\nenv = \"SHARDGATE_TEST_UNSET_TOKEN_VAR\"\n",
        );
        assert!(e.contains("SHARDGATE_TEST_UNSET_TOKEN_VAR"), "{e}");
        let e = err(
            "\n[admin]\nforward_with = \"r\"\n[[admin.tokens]]\nname = \"r\"\nrole = \"read\"\nvalue = \"0123456789abcdef0123\"\n",
        );
        assert!(e.contains("admin.forward_with"), "{e}");
        let e = err(
            "\n[admin]\n[[admin.tokens]]\nname = \"a\"\nrole = \"boss\"\nvalue = \"0123456789abcdef0123\"\n",
        );
        assert!(e.contains("boss"), "{e}");
        let e = err(
            "\n[admin]\n[admin.tls]\ncert = \"/nonexistent/admin.pem\"\nkey = \"/nonexistent/admin.key\"\n",
        );
        assert!(e.contains("admin.tls.cert"), "{e}");
        let e = err("\n[admin]\n[admin.tls]\ncert = \"/etc/hostname\"\n");
        assert!(e.contains("key"), "{e}");
    }
}
