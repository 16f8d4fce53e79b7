//! The users clients may authenticate as, from a TOML file (`listener.sasl.credentials`):
//! each user's password in SCRAM's salted form only, per hash. SASL/PLAIN is checked against
//! the same form (the password given is salted and compared), so no password is stored
//! anywhere. `shardgate credentials` writes entries.
//!
//! ```toml
//! [[users]]
//! name = "alice"
//! [users.scram-sha-256]
//! salt = "base64"
//! iterations = 8192
//! stored_key = "base64"
//! server_key = "base64"
//! ```

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

use super::scram::{Hash, MIN_ITERATIONS, ScramCredential, random_b64};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is not a valid credentials file: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: user {user:?}: {message}")]
    User {
        path: String,
        user: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    #[serde(rename = "scram-sha-256", default)]
    sha256: Option<Salted>,
    #[serde(rename = "scram-sha-512", default)]
    sha512: Option<Salted>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Salted {
    salt: String,
    iterations: u32,
    stored_key: String,
    server_key: String,
}

/// Users and their salted passwords.
#[derive(Debug, Clone)]
pub struct Credentials {
    users: HashMap<(String, Hash), ScramCredential>,
    /// The iteration count most users have (what an unknown user is shown).
    usual: u32,
}

impl Credentials {
    /// Nobody (until the store's copy is read).
    pub fn none() -> Self {
        Self {
            users: HashMap::new(),
            usual: super::scram::MIN_ITERATIONS,
        }
    }

    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CredentialsError::Read {
            path: p.clone(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, CredentialsError> {
        let file: File = toml::from_str(text).map_err(|e| CredentialsError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        let mut users = HashMap::new();
        for u in file.users {
            let bad = |message: String| CredentialsError::User {
                path: path.to_string(),
                user: u.name.clone(),
                message,
            };
            if u.name.is_empty() {
                return Err(bad("empty user name".into()));
            }
            if u.sha256.is_none() && u.sha512.is_none() {
                return Err(bad(
                    "no scram-sha-256 or scram-sha-512 entry (write one with `shardgate credentials`)"
                        .into(),
                ));
            }
            for (hash, salted) in [(Hash::Sha256, &u.sha256), (Hash::Sha512, &u.sha512)] {
                let Some(s) = salted else { continue };
                let decode = |field: &str, v: &str| {
                    B64.decode(v)
                        .map_err(|_| bad(format!("{}: {field} is not base64", hash.mechanism())))
                };
                let cred = ScramCredential {
                    salt: decode("salt", &s.salt)?,
                    iterations: s.iterations,
                    stored_key: decode("stored_key", &s.stored_key)?,
                    server_key: decode("server_key", &s.server_key)?,
                };
                if cred.iterations < MIN_ITERATIONS {
                    return Err(bad(format!(
                        "{}: {} iterations, at least {MIN_ITERATIONS} are needed",
                        hash.mechanism(),
                        cred.iterations
                    )));
                }
                let len = hash.digest_len();
                if cred.stored_key.len() != len || cred.server_key.len() != len {
                    return Err(bad(format!(
                        "{}: keys must be {len} bytes",
                        hash.mechanism()
                    )));
                }
                if users.insert((u.name.clone(), hash), cred).is_some() {
                    return Err(bad("listed twice".into()));
                }
            }
        }
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for c in users.values() {
            *counts.entry(c.iterations).or_default() += 1;
        }
        let usual = counts
            .into_iter()
            .max_by_key(|(i, n)| (*n, *i))
            .map_or(super::scram::MIN_ITERATIONS, |(i, _)| i);
        Ok(Self { users, usual })
    }

    pub fn scram(&self, user: &str, hash: Hash) -> Option<ScramCredential> {
        self.users.get(&(user.to_string(), hash)).cloned()
    }

    /// A stored form to check a PLAIN password against (SHA-512's if both exist).
    pub fn any(&self, user: &str) -> Option<(Hash, ScramCredential)> {
        [Hash::Sha512, Hash::Sha256]
            .into_iter()
            .find_map(|h| self.scram(user, h).map(|c| (h, c)))
    }

    /// The iteration count most users have (what an unknown user is shown).
    pub fn usual_iterations(&self) -> u32 {
        self.usual
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Bytes of salt in written entries (and in the decoys shown for unknown users).
pub const SALT_LEN: usize = 24;

/// A credentials-file entry for `user` with `password` salted for each of `hashes`.
pub fn entry(user: &str, password: &str, hashes: &[Hash], iterations: u32) -> String {
    let mut out = format!("[[users]]\nname = {}\n", toml_string(user));
    for h in hashes {
        let salt = B64.decode(random_b64(SALT_LEN)).expect("own base64");
        let c = ScramCredential::derive(*h, password, &salt, iterations);
        out.push_str(&format!(
            "[users.{}]\nsalt = \"{}\"\niterations = {}\nstored_key = \"{}\"\nserver_key = \"{}\"\n",
            h.mechanism().to_ascii_lowercase(),
            B64.encode(&c.salt),
            c.iterations,
            B64.encode(&c.stored_key),
            B64.encode(&c.server_key),
        ));
    }
    out
}

fn toml_string(s: &str) -> String {
    let escaped: String = s
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_entries_load_and_check_passwords() {
        let text = format!(
            "{}\n{}",
            entry("alice", "s3cret", &[Hash::Sha256, Hash::Sha512], 4096),
            entry("b\"ob", "pw", &[Hash::Sha256], 5000)
        );
        let c = Credentials::parse(&text, "t.toml").unwrap();
        assert_eq!(c.len(), 3);
        let (h, a) = c.any("alice").unwrap();
        assert_eq!(h, Hash::Sha512);
        assert!(a.verify_password(h, "s3cret"));
        assert!(!a.verify_password(h, "S3cret"));
        assert!(c.scram("b\"ob", Hash::Sha256).is_some());
        assert!(c.scram("b\"ob", Hash::Sha512).is_none());
        assert!(c.any("carol").is_none());
    }

    #[test]
    fn bad_files_name_the_user_and_the_problem() {
        let e = Credentials::parse("[[users]]\nname = \"x\"\n", "c.toml").unwrap_err();
        assert!(
            e.to_string().contains("\"x\"") && e.to_string().contains("scram"),
            "{e}"
        );
        let weak = entry("w", "pw", &[Hash::Sha256], 4096).replace("4096", "100");
        let e = Credentials::parse(&weak, "c.toml").unwrap_err();
        assert!(e.to_string().contains("4096"), "{e}");
        let e = Credentials::parse("users = 3", "c.toml").unwrap_err();
        assert!(e.to_string().contains("c.toml"), "{e}");
    }
}
