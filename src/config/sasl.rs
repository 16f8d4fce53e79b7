//! `[listener.sasl]`: SASL authentication of clients on the listener; `[upstream.sasl]`:
//! shardgate's own SASL identity towards Kafka.

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
    /// "PLAIN", "SCRAM-SHA-256" or "SCRAM-SHA-512".
    pub mechanism: String,
    pub username: String,
    /// The password, or
    #[serde(default)]
    pub password: Option<String>,
    /// the environment variable holding it.
    #[serde(default)]
    pub password_env: Option<String>,
}

impl std::fmt::Debug for UpstreamSaslConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpstreamSaslConfig({} as {}, password {})",
            self.mechanism,
            self.username,
            if self.password.is_some() {
                "given"
            } else {
                "from the environment"
            }
        )
    }
}

/// `[upstream.sasl]` validated, its password read.
#[derive(Clone)]
pub struct UpstreamSasl {
    pub mechanism: Mechanism,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for UpstreamSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpstreamSasl({} as {})",
            self.mechanism.name(),
            self.username
        )
    }
}

impl UpstreamSaslConfig {
    pub fn resolve(&self) -> Result<UpstreamSasl, ConfigError> {
        let mechanism = Mechanism::parse(&self.mechanism).ok_or_else(|| {
            invalid(
                "upstream.sasl.mechanism",
                format!("\"{}\" is not supported", self.mechanism),
                "use \"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\"",
            )
        })?;
        if self.username.is_empty() {
            return Err(invalid(
                "upstream.sasl.username",
                "is empty",
                "give the user shardgate authenticates to Kafka as",
            ));
        }
        let password = secret(
            ("password", &self.password),
            ("password_env", &self.password_env),
            "upstream.sasl",
        )?;
        Ok(UpstreamSasl {
            mechanism,
            username: self.username.clone(),
            password,
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
        assert_eq!(ok.upstream_sasl.unwrap().username, "svc");
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
