//! `[authorization]`: what each client principal may do, in Kafka's ACL vocabulary, and
//! whether clients may change the real cluster's ACLs or delete records.

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::auth::acl::{
    AclRule, Authorizer, CLUSTER_NAME, Operation, PatternType, Permission, ResourceType,
};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// false (default): every client may do what shardgate's own principal may upstream.
    #[serde(default)]
    pub enabled: bool,
    /// Principals allowed everything ("User:admin").
    #[serde(default)]
    pub super_users: Vec<String>,
    /// Kafka's `allow.everyone.if.no.acl.found`: a resource no rule names is open to all.
    #[serde(default)]
    pub allow_if_no_acl: bool,
    /// CreateAcls, DeleteAcls and DeleteRecords act on the real cluster as shardgate's
    /// principal; they are refused (for all but super users) unless this is true.
    #[serde(default)]
    pub allow_cluster_changes: bool,
    #[serde(default)]
    pub acls: Vec<AclConfig>,
    /// More rules from the Consul store (key `shardgate/<cluster>/security/acls`: a TOML text
    /// of `[[acls]]` entries as below), followed while running, so every instance applies the
    /// same rules.
    #[serde(default)]
    pub acls_in_store: bool,
}

/// The store's ACL document: `[[acls]]` entries as in `[[authorization.acls]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclDocument {
    #[serde(default)]
    pub acls: Vec<AclConfig>,
}

/// One `[[authorization.acls]]` entry: like `kafka-acls --add`, one rule per operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    pub principal: String,
    #[serde(default = "any_host")]
    pub host: String,
    pub operations: Vec<String>,
    pub resource_type: String,
    /// Not needed for the cluster resource.
    #[serde(default)]
    pub resource_name: Option<String>,
    #[serde(default = "literal")]
    pub pattern_type: String,
    #[serde(default = "allow")]
    pub permission: String,
}

fn any_host() -> String {
    "*".into()
}
fn literal() -> String {
    "literal".into()
}
fn allow() -> String {
    "allow".into()
}

/// The validated form: the rules when enforced, and the cluster-change switch.
#[derive(Debug, Clone, Default)]
pub struct Authorization {
    /// None: authorization is off (every client acts as shardgate's principal).
    pub acls: Option<std::sync::Arc<Authorizer>>,
    /// The config file's rules (the store's are added to them).
    pub rules: Vec<AclRule>,
    pub super_users: Vec<String>,
    pub allow_cluster_changes: bool,
}

impl AuthorizationConfig {
    pub fn resolve(&self) -> Result<Authorization, ConfigError> {
        for (i, p) in self.super_users.iter().enumerate() {
            check_principal(&format!("authorization.super_users[{i}]"), p)?;
        }
        if !self.enabled && self.acls_in_store {
            return Err(invalid(
                "authorization.acls_in_store",
                "is true but authorization.enabled is false: the rules would not apply",
                "set authorization.enabled = true, or acls_in_store = false",
            ));
        }
        if !self.enabled && !self.acls.is_empty() {
            return Err(invalid(
                "authorization.acls",
                "rules are listed but authorization.enabled is false: they would not apply",
                "set authorization.enabled = true, or remove the rules",
            ));
        }
        let mut rules = Vec::new();
        for (i, a) in self.acls.iter().enumerate() {
            rules.extend(a.rules(&format!("authorization.acls[{i}]"))?);
        }
        Ok(Authorization {
            acls: self
                .enabled
                .then(|| std::sync::Arc::new(self.authorizer(rules.clone()))),
            rules,
            super_users: self.super_users.clone(),
            allow_cluster_changes: self.allow_cluster_changes,
        })
    }

    /// The decision with `rules` and this section's super users and default.
    pub fn authorizer(&self, rules: Vec<AclRule>) -> Authorizer {
        Authorizer::new(rules, self.super_users.clone(), self.allow_if_no_acl)
    }
}

impl AclDocument {
    /// The rules of the store's ACL document (`what` names it in errors).
    pub fn parse(text: &str, what: &str) -> Result<Vec<AclRule>, ConfigError> {
        let doc: AclDocument = toml::from_str(text).map_err(|e| {
            invalid(
                what,
                format!("is not a valid ACL document: {e}"),
                "write [[acls]] entries as in [[authorization.acls]]",
            )
        })?;
        let mut rules = Vec::new();
        for (i, a) in doc.acls.iter().enumerate() {
            rules.extend(a.rules(&format!("{what}: acls[{i}]"))?);
        }
        Ok(rules)
    }
}

fn check_principal(key: &str, p: &str) -> Result<(), ConfigError> {
    match p.strip_prefix("User:") {
        Some(name) if !name.is_empty() => Ok(()),
        _ => Err(invalid(
            key,
            format!("\"{p}\" is not a principal"),
            "write \"User:NAME\" (or \"User:*\" for everyone in a rule)",
        )),
    }
}

impl AclConfig {
    fn rules(&self, key: &str) -> Result<Vec<AclRule>, ConfigError> {
        check_principal(&format!("{key}.principal"), &self.principal)?;
        if self.host != "*" && self.host.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(
                &format!("{key}.host"),
                format!("\"{}\" is not an IP address", self.host),
                "use the client's IP address, or \"*\" for any",
            ));
        }
        let resource_type = ResourceType::parse(&self.resource_type).ok_or_else(|| {
            invalid(
                &format!("{key}.resource_type"),
                format!("\"{}\" is not a resource type", self.resource_type),
                "use \"Topic\", \"Group\", \"TransactionalId\" or \"Cluster\"",
            )
        })?;
        let pattern_type = match self.pattern_type.to_ascii_lowercase().as_str() {
            "literal" => PatternType::Literal,
            "prefixed" => PatternType::Prefixed,
            other => {
                return Err(invalid(
                    &format!("{key}.pattern_type"),
                    format!("\"{other}\" is not a pattern type"),
                    "use \"literal\" (\"*\" matches all) or \"prefixed\"",
                ));
            }
        };
        let permission = match self.permission.to_ascii_lowercase().as_str() {
            "allow" => Permission::Allow,
            "deny" => Permission::Deny,
            other => {
                return Err(invalid(
                    &format!("{key}.permission"),
                    format!("\"{other}\" is not a permission"),
                    "use \"allow\" or \"deny\"",
                ));
            }
        };
        let resource_name = match (resource_type, self.resource_name.as_deref()) {
            (ResourceType::Cluster, None | Some(CLUSTER_NAME)) => CLUSTER_NAME.to_string(),
            (ResourceType::Cluster, Some(other)) => {
                return Err(invalid(
                    &format!("{key}.resource_name"),
                    format!("the cluster resource is \"{CLUSTER_NAME}\", not \"{other}\""),
                    "leave resource_name out for resource_type = \"Cluster\"",
                ));
            }
            (_, Some(name)) if !name.is_empty() => name.to_string(),
            _ => {
                return Err(invalid(
                    &format!("{key}.resource_name"),
                    "is missing or empty",
                    "name the topic, group or transactional id (\"*\" for all of them)",
                ));
            }
        };
        if self.operations.is_empty() {
            return Err(invalid(
                &format!("{key}.operations"),
                "is empty",
                "list operations such as [\"Read\", \"Describe\"]",
            ));
        }
        self.operations
            .iter()
            .map(|op| {
                let operation = Operation::parse(op).ok_or_else(|| {
                    invalid(
                        &format!("{key}.operations"),
                        format!("\"{op}\" is not an operation"),
                        "use Kafka's names: Read, Write, Create, Delete, Alter, Describe, \
                         ClusterAction, DescribeConfigs, AlterConfigs, IdempotentWrite, All",
                    )
                })?;
                Ok(AclRule {
                    principal: self.principal.clone(),
                    host: match self.host.parse::<std::net::IpAddr>() {
                        Ok(ip) => ip.to_canonical().to_string(),
                        Err(_) => self.host.clone(),
                    },
                    operation,
                    resource_type,
                    pattern_type,
                    resource_name: resource_name.clone(),
                    permission,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, parse};
    use crate::auth::acl::Subject;

    #[test]
    fn rules_are_read_in_kafka_vocabulary() {
        let s = parse(&format!(
            r#"{MINIMAL}
[authorization]
enabled = true
super_users = ["User:admin"]
[[authorization.acls]]
principal = "User:alice"
operations = ["Read", "describe"]
resource_type = "topic"
resource_name = "orders."
pattern_type = "prefixed"
[[authorization.acls]]
principal = "User:alice"
operations = ["IdempotentWrite"]
resource_type = "Cluster"
"#
        ))
        .unwrap();
        let acls = s.authorization.acls.expect("enabled");
        let alice = Subject::new(Some("alice"), "127.0.0.1".parse().unwrap());
        use crate::auth::acl::{Operation, ResourceType};
        assert!(acls.authorize(&alice, Operation::Read, ResourceType::Topic, "orders.x"));
        assert!(acls.authorize(
            &alice,
            Operation::IdempotentWrite,
            ResourceType::Cluster,
            "kafka-cluster"
        ));
        assert!(!s.authorization.allow_cluster_changes);
        assert!(parse(MINIMAL).unwrap().authorization.acls.is_none());
    }

    #[test]
    fn bad_rules_name_the_key() {
        let bad = |entry: &str| {
            parse(&format!(
                "{MINIMAL}\n[authorization]\nenabled = true\n[[authorization.acls]]\n{entry}\n"
            ))
            .unwrap_err()
            .to_string()
        };
        let e = bad(
            "principal = \"alice\"\noperations = [\"Read\"]\nresource_type = \"Topic\"\nresource_name = \"t\"",
        );
        assert!(e.contains("authorization.acls[0].principal"), "{e}");
        let e = bad(
            "principal = \"User:a\"\noperations = [\"Eat\"]\nresource_type = \"Topic\"\nresource_name = \"t\"",
        );
        assert!(
            e.contains("authorization.acls[0].operations") && e.contains("Eat"),
            "{e}"
        );
        let e = bad("principal = \"User:a\"\noperations = [\"Read\"]\nresource_type = \"Topic\"");
        assert!(e.contains("authorization.acls[0].resource_name"), "{e}");
        let e = bad(
            "principal = \"User:a\"\noperations = [\"Read\"]\nresource_type = \"Broker\"\nresource_name = \"t\"",
        );
        assert!(e.contains("resource_type"), "{e}");
        let e = bad(
            "principal = \"User:a\"\noperations = [\"Read\"]\nresource_type = \"Topic\"\nresource_name = \"t\"\npermission = \"maybe\"",
        );
        assert!(e.contains("permission"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}\n[[authorization.acls]]\nprincipal = \"User:a\"\noperations = [\"Read\"]\nresource_type = \"Topic\"\nresource_name = \"t\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("authorization.enabled"), "{e}");
    }

    #[test]
    fn store_documents_need_the_consul_store_and_parse_like_the_config() {
        let e = parse(&format!(
            "{MINIMAL}\n[authorization]\nenabled = true\nacls_in_store = true\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("authorization.acls_in_store") && e.contains("Consul"),
            "{e}"
        );
        assert!(
            parse(&format!(
                "{MINIMAL}\n[store]\nkind = \"consul\"\n[authorization]\nenabled = true\nacls_in_store = true\n"
            ))
            .is_ok()
        );
        let entry = "[[acls]]\nprincipal = \"User:a\"\noperations = [\"Read\", \"Write\"]\nresource_type = \"Topic\"\nresource_name = \"t\"\n";
        assert_eq!(
            super::AclDocument::parse(entry, "security/acls")
                .unwrap()
                .len(),
            2
        );
        let e = super::AclDocument::parse("[[acls]]\nprincipal = \"a\"\n", "security/acls")
            .unwrap_err()
            .to_string();
        assert!(e.contains("security/acls"), "{e}");
    }
}
