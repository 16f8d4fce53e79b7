//! `[listener.sasl]`: SASL authentication of clients on the listener; `[upstream.sasl]`:
//! shardgate's own SASL identity towards Kafka.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::auth::{Credentials, Mechanism};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslListenerConfig {
    /// Mechanisms offered: "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512".
    pub mechanisms: Vec<String>,
    /// The users, their passwords in SCRAM's salted form (`shardgate credentials` writes
    /// entries). Not with `credentials_in_store`.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// The same file's text from the Consul store (key `shardgate/<cluster>/security/credentials`),
    /// followed while running, so every instance knows the same users.
    #[serde(default)]
    pub credentials_in_store: bool,
    /// KIP-368: how long an authentication lasts; clients re-authenticate before it ends, and
    /// a connection that did not is closed at its next request. 0: for the connection's life.
    #[serde(default)]
    pub session_lifetime_ms: u64,
    /// Failed authentications allowed per source address within a minute; beyond, its
    /// attempts are refused without being checked.
    #[serde(default = "default_max_failures")]
    pub max_failures_per_minute: u32,
}

fn default_max_failures() -> u32 {
    10
}

impl SaslListenerConfig {
    /// The mechanisms, parsed; the credentials file is read to check it.
    pub fn validate(&self) -> Result<Vec<Mechanism>, ConfigError> {
        if self.mechanisms.is_empty() {
            return Err(invalid(
                "listener.sasl.mechanisms",
                "is empty",
                "list at least one of \"PLAIN\", \"SCRAM-SHA-256\", \"SCRAM-SHA-512\"",
            ));
        }
        let mut out = Vec::new();
        for m in &self.mechanisms {
            let Some(parsed) = Mechanism::parse(m) else {
                return Err(invalid(
                    "listener.sasl.mechanisms",
                    format!("\"{m}\" is not supported"),
                    "use \"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\"",
                ));
            };
            if !out.contains(&parsed) {
                out.push(parsed);
            }
        }
        match (&self.credentials, self.credentials_in_store) {
            (Some(_), true) => {
                return Err(invalid(
                    "listener.sasl.credentials",
                    "is set while listener.sasl.credentials_in_store is true",
                    "keep one: a file, or the store's copy",
                ));
            }
            (None, false) => {
                return Err(invalid(
                    "listener.sasl.credentials",
                    "is missing",
                    "point it at a credentials file (entries from `shardgate credentials USER`), \
                     or set credentials_in_store = true with the Consul store",
                ));
            }
            (Some(path), false) => {
                let creds = Credentials::load(path).map_err(|e| {
                    invalid(
                        "listener.sasl.credentials",
                        e.to_string(),
                        "point it at a credentials file (entries from `shardgate credentials USER`)",
                    )
                })?;
                if creds.is_empty() {
                    return Err(invalid(
                        "listener.sasl.credentials",
                        format!("{} lists no user", path.display()),
                        "add users with `shardgate credentials USER >> FILE`",
                    ));
                }
            }
            (None, true) => {}
        }
        if self.max_failures_per_minute == 0 {
            return Err(invalid(
                "listener.sasl.max_failures_per_minute",
                "is 0: nobody could ever fail once",
                "use 10 (the default) or another positive number",
            ));
        }
        Ok(out)
    }
}

/// `[upstream.sasl]`: how shardgate authenticates to the brokers (its service principal).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSaslConfig {
    /// "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512" or "OAUTHBEARER".
    pub mechanism: String,
    /// PLAIN and SCRAM: the user, its password, or
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// the environment variable holding it.
    #[serde(default)]
    pub password_env: Option<String>,
    /// OAUTHBEARER: a file holding the token (a JWT), read again at every authentication so
    /// whatever renews it (a sidecar, a mounted secret) is followed; or
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// the OAuth token endpoint shardgate asks for a token with the client-credentials grant,
    /// as Kafka's own clients do (`sasl.oauthbearer.token.endpoint.url`).
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Scope asked for (optional).
    #[serde(default)]
    pub scope: Option<String>,
    /// Audience asked for (optional; Auth0, Ory Hydra and others put it in the token's `aud`
    /// only when asked, and brokers with `sasl.oauthbearer.expected.audience` require it).
    #[serde(default)]
    pub audience: Option<String>,
    /// PEM CAs that sign an `https://` token endpoint's certificate.
    #[serde(default)]
    pub token_endpoint_ca: Option<PathBuf>,
    /// SASL extensions sent with the token (e.g. Confluent Cloud's `logicalCluster`).
    #[serde(default)]
    pub extensions: BTreeMap<String, String>,
}

impl std::fmt::Debug for UpstreamSaslConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpstreamSaslConfig({} as {:?}, token file {:?}, endpoint {:?})",
            self.mechanism, self.username, self.token_file, self.token_endpoint
        )
    }
}

/// `[upstream.sasl]` validated, its secrets read.
#[derive(Clone)]
pub enum UpstreamSasl {
    /// PLAIN or SCRAM.
    Password {
        mechanism: Mechanism,
        username: String,
        password: String,
    },
    OAuthBearer(OAuthBearer),
}

/// Where OAUTHBEARER tokens come from, and the extensions sent with them.
#[derive(Clone)]
pub struct OAuthBearer {
    pub source: TokenSource,
    pub extensions: Vec<(String, String)>,
}

#[derive(Clone)]
pub enum TokenSource {
    File(PathBuf),
    Endpoint {
        url: String,
        client_id: String,
        client_secret: String,
        scope: Option<String>,
        audience: Option<String>,
        ca: Option<PathBuf>,
    },
}

impl UpstreamSasl {
    pub fn mechanism_name(&self) -> &'static str {
        match self {
            UpstreamSasl::Password { mechanism, .. } => mechanism.name(),
            UpstreamSasl::OAuthBearer(_) => "OAUTHBEARER",
        }
    }
}

impl std::fmt::Debug for UpstreamSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamSasl::Password {
                mechanism,
                username,
                ..
            } => write!(f, "UpstreamSasl({} as {username})", mechanism.name()),
            UpstreamSasl::OAuthBearer(o) => match &o.source {
                TokenSource::File(p) => {
                    write!(f, "UpstreamSasl(OAUTHBEARER from {})", p.display())
                }
                TokenSource::Endpoint { url, client_id, .. } => {
                    write!(f, "UpstreamSasl(OAUTHBEARER from {url} as {client_id})")
                }
            },
        }
    }
}

const MECHANISMS: &str = "use \"PLAIN\", \"SCRAM-SHA-256\", \"SCRAM-SHA-512\" or \"OAUTHBEARER\"";

impl UpstreamSaslConfig {
    pub fn resolve(&self) -> Result<UpstreamSasl, ConfigError> {
        if self.mechanism == "OAUTHBEARER" {
            return self.resolve_oauth().map(UpstreamSasl::OAuthBearer);
        }
        let mechanism = Mechanism::parse(&self.mechanism).ok_or_else(|| {
            invalid(
                "upstream.sasl.mechanism",
                format!("\"{}\" is not supported", self.mechanism),
                MECHANISMS,
            )
        })?;
        let oauth_only = [
            ("token_file", self.token_file.is_some()),
            ("token_endpoint", self.token_endpoint.is_some()),
            ("client_id", self.client_id.is_some()),
            ("extensions", !self.extensions.is_empty()),
        ];
        if let Some((key, _)) = oauth_only.iter().find(|(_, set)| *set) {
            return Err(invalid(
                &format!("upstream.sasl.{key}"),
                format!("is set while the mechanism is {}", self.mechanism),
                "remove it, or use mechanism = \"OAUTHBEARER\"",
            ));
        }
        let username = self.username.clone().unwrap_or_default();
        if username.is_empty() {
            return Err(invalid(
                "upstream.sasl.username",
                "is missing or empty",
                "give the user shardgate authenticates to Kafka as",
            ));
        }
        let password = secret(
            ("password", &self.password),
            ("password_env", &self.password_env),
            "upstream.sasl",
        )?;
        Ok(UpstreamSasl::Password {
            mechanism,
            username,
            password,
        })
    }

    fn resolve_oauth(&self) -> Result<OAuthBearer, ConfigError> {
        let key = |k: &str| format!("upstream.sasl.{k}");
        if self.username.is_some() || self.password.is_some() || self.password_env.is_some() {
            return Err(invalid(
                "upstream.sasl.username",
                "OAUTHBEARER takes no username or password",
                "give token_file, or token_endpoint with client_id and client_secret",
            ));
        }
        let source = match (&self.token_file, &self.token_endpoint) {
            (Some(path), None) => {
                if !path.is_file() {
                    return Err(invalid(
                        &key("token_file"),
                        format!("{} is not a readable file", path.display()),
                        "point it at the file holding the token",
                    ));
                }
                TokenSource::File(path.clone())
            }
            (None, Some(url)) => {
                let https = url.starts_with("https://");
                if !https && !url.starts_with("http://") {
                    return Err(invalid(
                        &key("token_endpoint"),
                        format!("\"{url}\" is not an http:// or https:// URL"),
                        "give the identity provider's token URL",
                    ));
                }
                if https && self.token_endpoint_ca.is_none() {
                    return Err(invalid(
                        &key("token_endpoint_ca"),
                        "is missing for an https:// token endpoint",
                        "point it at the PEM CAs that sign the endpoint's certificate",
                    ));
                }
                if let Some(ca) = self.token_endpoint_ca.as_ref().filter(|ca| !ca.is_file()) {
                    return Err(invalid(
                        &key("token_endpoint_ca"),
                        format!("{} is not a readable file", ca.display()),
                        "point it at a PEM file",
                    ));
                }
                let client_id = self.client_id.clone().unwrap_or_default();
                if client_id.is_empty() {
                    return Err(invalid(
                        &key("client_id"),
                        "is missing or empty",
                        "give the OAuth client shardgate authenticates as",
                    ));
                }
                let client_secret = secret(
                    ("client_secret", &self.client_secret),
                    ("client_secret_env", &self.client_secret_env),
                    "upstream.sasl",
                )?;
                TokenSource::Endpoint {
                    url: url.clone(),
                    client_id,
                    client_secret,
                    scope: self.scope.clone(),
                    audience: self.audience.clone(),
                    ca: self.token_endpoint_ca.clone(),
                }
            }
            _ => {
                return Err(invalid(
                    "upstream.sasl",
                    "OAUTHBEARER needs exactly one of token_file and token_endpoint",
                    "give the token's file, or the token endpoint with client_id and client_secret",
                ));
            }
        };
        // RFC 7628: keys are letters; values printable, no separator (0x01). `auth` is the
        // token's own key.
        for (k, v) in &self.extensions {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphabetic()) || k == "auth" {
                return Err(invalid(
                    &key("extensions"),
                    format!("\"{k}\" is not a valid extension name"),
                    "use letters only, and not \"auth\"",
                ));
            }
            // Kafka's OAuthBearerClientInitialResponse accepts [\x21-\x7E \t\r\n]+ only.
            if v.is_empty()
                || !v
                    .chars()
                    .all(|c| matches!(c, '\x21'..='\x7e' | ' ' | '\t' | '\r' | '\n'))
            {
                return Err(invalid(
                    &key(&format!("extensions.{k}")),
                    "is empty or holds characters Kafka refuses",
                    "use printable ASCII",
                ));
            }
        }
        Ok(OAuthBearer {
            source,
            extensions: self
                .extensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// A secret given in the file (`value.0`) or named as an environment variable (`env.0`):
/// exactly one of them, and the variable set.
pub(super) fn secret(
    value: (&str, &Option<String>),
    env: (&str, &Option<String>),
    table: &str,
) -> Result<String, ConfigError> {
    match (value.1, env.1) {
        (Some(v), None) => Ok(v.clone()),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            invalid(
                &format!("{table}.{}", env.0),
                format!("environment variable {var} is not set"),
                format!("set it before starting shardgate, or give `{}`", value.0),
            )
        }),
        _ => Err(invalid(
            table,
            format!("needs exactly one of `{}` and `{}`", value.0, env.0),
            format!(
                "give the secret as `{}`, or the environment variable holding it as `{}`",
                value.0, env.0
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, parse};

    #[test]
    fn sasl_settings_are_checked() {
        let dir = std::env::temp_dir().join(format!("sg-sasl-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let creds = dir.join("users.toml");
        std::fs::write(
            &creds,
            crate::auth::credentials::entry("u", "p", &[crate::auth::scram::Hash::Sha256], 4096),
        )
        .unwrap();
        let with = |sasl: &str| {
            parse(&MINIMAL.replacen(
                "[upstream]",
                &format!("[listener.sasl]\n{sasl}\n[upstream]"),
                1,
            ))
        };
        let ok = format!(
            "mechanisms = [\"SCRAM-SHA-256\", \"PLAIN\"]\ncredentials = \"{}\"",
            creds.display()
        );
        with(&ok).unwrap();
        let e = with(&format!(
            "mechanisms = [\"GSSAPI\"]\ncredentials = \"{}\"",
            creds.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listener.sasl.mechanisms") && e.contains("GSSAPI"),
            "{e}"
        );
        let e = with("mechanisms = [\"PLAIN\"]\ncredentials = \"/nonexistent/users.toml\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listener.sasl.credentials"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let up = |sasl: &str| parse(&format!("{MINIMAL}[upstream.sasl]\n{sasl}\n"));
        let ok =
            up("mechanism = \"SCRAM-SHA-512\"\nusername = \"svc\"\npassword = \"pw\"").unwrap();
        assert!(matches!(
            ok.upstream_sasl.unwrap(),
            super::UpstreamSasl::Password { username, .. } if username == "svc"
        ));
        let token = std::env::temp_dir().join(format!("sg-oauth-cfg-{}", std::process::id()));
        std::fs::write(&token, "a.b.").unwrap();
        let ok = up(&format!(
            "mechanism = \"OAUTHBEARER\"\ntoken_file = \"{}\"\nextensions = {{ logicalCluster = \"lkc-1\" }}",
            token.display()
        ))
        .unwrap();
        assert_eq!(ok.upstream_sasl.unwrap().mechanism_name(), "OAUTHBEARER");
        std::fs::remove_file(&token).unwrap();
        for (bad, key) in [
            (
                "token_file = \"/nonexistent/token\"",
                "upstream.sasl.token_file",
            ),
            (
                "token_endpoint = \"https://idp/token\"\nclient_id = \"c\"\nclient_secret = \"s\"",
                "upstream.sasl.token_endpoint_ca",
            ),
            (
                "token_endpoint = \"ftp://idp/token\"",
                "upstream.sasl.token_endpoint",
            ),
            (
                "token_endpoint = \"http://idp/token\"\nclient_secret = \"s\"",
                "upstream.sasl.client_id",
            ),
            (
                "token_endpoint = \"http://idp/token\"\nclient_id = \"c\"",
                "client_secret",
            ),
            (
                "username = \"u\"\ntoken_endpoint = \"http://idp/token\"",
                "upstream.sasl.username",
            ),
            ("", "exactly one of token_file and token_endpoint"),
            (
                "token_endpoint = \"http://idp/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nextensions = { auth = \"x\" }",
                "upstream.sasl.extensions",
            ),
        ] {
            let e = up(&format!("mechanism = \"OAUTHBEARER\"\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let e =
            up("mechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"p\"\ntoken_file = \"/x\"")
                .unwrap_err()
                .to_string();
        assert!(e.contains("upstream.sasl.token_file"), "{e}");
        let e = up("mechanism = \"GSSAPI\"\nusername = \"svc\"\npassword = \"pw\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream.sasl.mechanism"), "{e}");
        let e = up("mechanism = \"PLAIN\"\nusername = \"svc\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("password"), "{e}");
    }
}
