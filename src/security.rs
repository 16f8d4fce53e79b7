//! Users and ACL rules kept in the Consul store, so every instance of a virtual cluster
//! authenticates the same users and applies the same rules (`listener.sasl.credentials_in_store`,
//! `authorization.acls_in_store`). Operators write the documents with Consul's own tools
//! (`consul kv put shardgate/<cluster>/security/credentials @users.toml`); each instance
//! follows them with blocking queries and swaps them in whole. A document that does not parse
//! is refused (logged, counted) and the previous one stays; until the ACL document has been
//! read, or once it is deleted, only super users are allowed, and a deleted credentials
//! document leaves no users: closed, not open.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::auth::Authenticator;
use crate::auth::acl::{AclRule, Authorizer};
use crate::config::{AclDocument, AuthorizationConfig};
use crate::store::ShardStore;

pub const CREDENTIALS_KEY: &str = "security/credentials";
pub const ACLS_KEY: &str = "security/acls";

/// Where the store's documents go.
pub struct Targets {
    pub authenticator: Option<Arc<Authenticator>>,
    /// The rules in force (None: authorization off); the store's are added to `file_rules`.
    pub acls: Arc<ArcSwapOption<Authorizer>>,
    pub authorization: AuthorizationConfig,
    pub file_rules: Vec<AclRule>,
}

impl Targets {
    fn apply(&self, key: &str, text: Option<&str>) -> Result<String, String> {
        match key {
            CREDENTIALS_KEY => {
                let Some(auth) = &self.authenticator else {
                    return Ok("unused".into());
                };
                let creds = match text {
                    Some(t) => {
                        crate::auth::Credentials::parse(t, key).map_err(|e| e.to_string())?
                    }
                    None => crate::auth::Credentials::none(),
                };
                let users = creds.len();
                auth.replace_credentials(creds);
                Ok(format!("{users} credentials"))
            }
            _ => {
                let Some(t) = text else {
                    // Without the store's rules (its DENYs among them) the file's alone could
                    // open what the store closes: nobody but super users until it is back.
                    self.acls.store(Some(Arc::new(Authorizer::closed(
                        self.authorization.super_users.clone(),
                    ))));
                    return Ok("no document: only super users are allowed".into());
                };
                let extra = AclDocument::parse(t, key).map_err(|e| e.to_string())?;
                let n = extra.len();
                let mut rules = self.file_rules.clone();
                rules.extend(extra);
                self.acls
                    .store(Some(Arc::new(self.authorization.authorizer(rules))));
                Ok(format!("{n} rules"))
            }
        }
    }
}

fn record(key: &str, result: &Result<String, String>) {
    let label = match result {
        Ok(_) => "applied",
        Err(_) => "refused",
    };
    metrics::counter!("shardgate_security_documents_total", "document" => key.to_string(), "result" => label)
        .increment(1);
    match result {
        Ok(what) => tracing::info!(document = key, what = %what, "security document applied"),
        Err(e) => {
            tracing::error!(document = key, error = %e, "security document refused; the previous one stays in force")
        }
    }
}

/// Reads `key` once (retrying while the store is unreachable, up to `limit`) and applies it;
/// the index to follow it from.
pub async fn load(store: &dyn ShardStore, targets: &Targets, key: &str, limit: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match store.watch_text(key, 0).await {
            Ok((index, text)) => {
                record(key, &targets.apply(key, text.as_deref()));
                return index;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(document = key, error = %e, "reading a security document failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::error!(document = key, error = %e, "security document unreadable; following it in the background");
                return 0;
            }
        }
    }
}

/// Follows `key` for the life of the process, applying each change.
pub async fn follow(
    store: Arc<dyn ShardStore>,
    targets: Arc<Targets>,
    key: &'static str,
    mut index: u64,
) {
    // A deleted key keeps its last index: its absence is the change.
    let mut present = true;
    loop {
        match store.watch_text(key, index).await {
            Ok((new, text)) if new != index || text.is_some() != present => {
                index = new;
                present = text.is_some();
                record(key, &targets.apply(key, text.as_deref()));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(document = key, error = %e, "following a security document failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
