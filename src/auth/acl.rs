//! Authorization in Kafka's ACL vocabulary, decided in shardgate: upstream sees one principal
//! (shardgate's), so the rules for each client principal are enforced here.
//!
//! The decision follows Kafka's `StandardAuthorizer`: super users may do anything; a matching
//! DENY wins over any ALLOW; an ALLOW of READ, WRITE, DELETE or ALTER also allows DESCRIBE,
//! ALTER_CONFIGS also allows DESCRIBE_CONFIGS; with no rule at all on a resource the answer is
//! `allow_if_no_acl` (Kafka's `allow.everyone.if.no.acl.found`, false by default).

use std::net::IpAddr;

/// The one cluster resource's name, as Kafka names it.
pub const CLUSTER_NAME: &str = "kafka-cluster";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    Topic,
    Group,
    TransactionalId,
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    All,
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    ClusterAction,
    DescribeConfigs,
    AlterConfigs,
    IdempotentWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternType {
    /// The name as it is; "*" matches every resource of the type.
    Literal,
    /// Every resource whose name starts with the rule's name.
    Prefixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Allow,
    Deny,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Topic,
        ResourceType::Group,
        ResourceType::TransactionalId,
        ResourceType::Cluster,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ResourceType::Topic => "Topic",
            ResourceType::Group => "Group",
            ResourceType::TransactionalId => "TransactionalId",
            ResourceType::Cluster => "Cluster",
        }
    }

    /// Kafka's names, case and separators ignored ("topic", "transactional-id", ...).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| loose_eq(r.name(), s))
    }
}

impl Operation {
    pub const ALL_OPS: [Operation; 11] = [
        Operation::All,
        Operation::Read,
        Operation::Write,
        Operation::Create,
        Operation::Delete,
        Operation::Alter,
        Operation::Describe,
        Operation::ClusterAction,
        Operation::DescribeConfigs,
        Operation::AlterConfigs,
        Operation::IdempotentWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::All => "All",
            Operation::Read => "Read",
            Operation::Write => "Write",
            Operation::Create => "Create",
            Operation::Delete => "Delete",
            Operation::Alter => "Alter",
            Operation::Describe => "Describe",
            Operation::ClusterAction => "ClusterAction",
            Operation::DescribeConfigs => "DescribeConfigs",
            Operation::AlterConfigs => "AlterConfigs",
            Operation::IdempotentWrite => "IdempotentWrite",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL_OPS.into_iter().find(|o| loose_eq(o.name(), s))
    }

    /// Kafka's AclOperation code, for the authorized-operations bit fields of Metadata.
    pub fn code(self) -> u8 {
        match self {
            Operation::All => 2,
            Operation::Read => 3,
            Operation::Write => 4,
            Operation::Create => 5,
            Operation::Delete => 6,
            Operation::Alter => 7,
            Operation::Describe => 8,
            Operation::ClusterAction => 9,
            Operation::DescribeConfigs => 10,
            Operation::AlterConfigs => 11,
            Operation::IdempotentWrite => 12,
        }
    }

    /// Whether an ALLOW of `self` allows `op`.
    fn allows(self, op: Operation) -> bool {
        self == op
            || self == Operation::All
            || (op == Operation::Describe
                && matches!(
                    self,
                    Operation::Read | Operation::Write | Operation::Delete | Operation::Alter
                ))
            || (op == Operation::DescribeConfigs && self == Operation::AlterConfigs)
    }
}

fn loose_eq(name: &str, s: &str) -> bool {
    let squash = |x: &str| {
        x.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect::<String>()
    };
    squash(name) == squash(s)
}

/// One rule, as `kafka-acls` would write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// "User:alice", or "User:*" for every principal.
    pub principal: String,
    /// The client's address, or "*".
    pub host: String,
    pub operation: Operation,
    pub resource_type: ResourceType,
    pub pattern_type: PatternType,
    pub resource_name: String,
    pub permission: Permission,
}

impl AclRule {
    fn covers_resource(&self, kind: ResourceType, name: &str) -> bool {
        self.resource_type == kind
            && match self.pattern_type {
                PatternType::Literal => self.resource_name == "*" || self.resource_name == name,
                PatternType::Prefixed => name.starts_with(&self.resource_name),
            }
    }

    fn covers_who(&self, principal: &str, host: &str) -> bool {
        (self.principal == principal || self.principal == "User:*")
            && (self.host == "*" || self.host == host)
    }
}

/// Who is asking: the principal ("User:alice"; "User:ANONYMOUS" without authentication) and
/// the address the connection came from.
#[derive(Debug, Clone)]
pub struct Subject {
    pub principal: String,
    pub host: String,
}

impl Subject {
    pub fn new(user: Option<&str>, addr: IpAddr) -> Self {
        Self {
            principal: format!("User:{}", user.unwrap_or("ANONYMOUS")),
            // An IPv4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
            host: addr.to_canonical().to_string(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    rules: Vec<AclRule>,
    super_users: Vec<String>,
    allow_if_no_acl: bool,
}

impl Authorizer {
    pub fn new(rules: Vec<AclRule>, super_users: Vec<String>, allow_if_no_acl: bool) -> Self {
        Self {
            rules,
            super_users,
            allow_if_no_acl,
        }
    }

    pub fn is_super_user(&self, who: &Subject) -> bool {
        self.super_users.contains(&who.principal)
    }

    pub fn authorize(&self, who: &Subject, op: Operation, kind: ResourceType, name: &str) -> bool {
        if self.is_super_user(who) {
            return true;
        }
        let mut any_rule = false;
        let mut allowed = false;
        for r in &self.rules {
            if !r.covers_resource(kind, name) {
                continue;
            }
            any_rule = true;
            if !r.covers_who(&who.principal, &who.host) {
                continue;
            }
            match r.permission {
                Permission::Deny if r.operation == op || r.operation == Operation::All => {
                    return false;
                }
                Permission::Allow if r.operation.allows(op) => allowed = true,
                _ => {}
            }
        }
        allowed || (!any_rule && self.allow_if_no_acl)
    }

    /// Whether some topic may be written (KIP-679: enough for an idempotent producer), as
    /// Kafka's `authorizeByResourceType`: an ALLOW of WRITE on topics for this principal that
    /// no DENY covers (a DENY on every topic, on the same literal name, or on a prefix of the
    /// ALLOW's pattern); with no topic rule at all, `allow_if_no_acl`.
    pub fn may_write_some_topic(&self, who: &Subject) -> bool {
        if self.is_super_user(who) {
            return true;
        }
        let writes = |r: &&AclRule| {
            r.resource_type == ResourceType::Topic
                && r.covers_who(&who.principal, &who.host)
                && matches!(r.operation, Operation::Write | Operation::All)
        };
        let denies: Vec<&AclRule> = self
            .rules
            .iter()
            .filter(writes)
            .filter(|r| r.permission == Permission::Deny)
            .collect();
        let covered = |allow: &AclRule| {
            denies.iter().any(|d| match d.pattern_type {
                PatternType::Literal => {
                    d.resource_name == "*"
                        || (allow.pattern_type == PatternType::Literal
                            && d.resource_name == allow.resource_name)
                }
                PatternType::Prefixed => allow.resource_name.starts_with(&d.resource_name),
            })
        };
        if self
            .rules
            .iter()
            .filter(writes)
            .any(|r| r.permission == Permission::Allow && !covered(r))
        {
            return true;
        }
        self.allow_if_no_acl
            && !self
                .rules
                .iter()
                .any(|r| r.resource_type == ResourceType::Topic)
    }

    /// Nobody but super users may do anything (store rules not read yet, or deleted).
    pub fn closed(super_users: Vec<String>) -> Self {
        Self::new(Vec::new(), super_users, false)
    }

    /// Kafka's authorized-operations bit field for a resource (bit = AclOperation code).
    pub fn authorized_operations(&self, who: &Subject, kind: ResourceType, name: &str) -> i32 {
        let ops: &[Operation] = match kind {
            ResourceType::Topic => &[
                Operation::Read,
                Operation::Write,
                Operation::Create,
                Operation::Delete,
                Operation::Alter,
                Operation::Describe,
                Operation::DescribeConfigs,
                Operation::AlterConfigs,
            ],
            ResourceType::Group => &[Operation::Read, Operation::Delete, Operation::Describe],
            ResourceType::TransactionalId => &[Operation::Write, Operation::Describe],
            ResourceType::Cluster => &[
                Operation::Create,
                Operation::Alter,
                Operation::Describe,
                Operation::ClusterAction,
                Operation::DescribeConfigs,
                Operation::AlterConfigs,
                Operation::IdempotentWrite,
            ],
        };
        ops.iter()
            .filter(|op| self.authorize(who, **op, kind, name))
            .fold(0, |bits, op| bits | (1 << op.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Operation::*;
    use ResourceType::*;

    fn rule(
        principal: &str,
        op: Operation,
        kind: ResourceType,
        pattern: PatternType,
        name: &str,
        permission: Permission,
    ) -> AclRule {
        AclRule {
            principal: principal.into(),
            host: "*".into(),
            operation: op,
            resource_type: kind,
            pattern_type: pattern,
            resource_name: name.into(),
            permission,
        }
    }

    fn alice() -> Subject {
        Subject::new(Some("alice"), "10.0.0.1".parse().unwrap())
    }

    #[test]
    fn allows_what_a_rule_grants_and_what_it_implies() {
        let a = Authorizer::new(
            vec![
                rule(
                    "User:alice",
                    Read,
                    Topic,
                    PatternType::Prefixed,
                    "orders.",
                    Permission::Allow,
                ),
                rule(
                    "User:alice",
                    AlterConfigs,
                    Topic,
                    PatternType::Literal,
                    "t",
                    Permission::Allow,
                ),
            ],
            vec![],
            false,
        );
        assert!(a.authorize(&alice(), Read, Topic, "orders.eu"));
        assert!(
            a.authorize(&alice(), Describe, Topic, "orders.eu"),
            "read implies describe"
        );
        assert!(!a.authorize(&alice(), Write, Topic, "orders.eu"));
        assert!(
            !a.authorize(&alice(), Read, Topic, "order"),
            "prefix is not matched backwards"
        );
        assert!(a.authorize(&alice(), DescribeConfigs, Topic, "t"));
        assert!(!a.authorize(&alice(), Describe, Topic, "t"));
        let bob = Subject::new(Some("bob"), "10.0.0.1".parse().unwrap());
        assert!(!a.authorize(&bob, Read, Topic, "orders.eu"));
    }

    #[test]
    fn deny_wins_and_is_not_implied() {
        let a = Authorizer::new(
            vec![
                rule(
                    "User:*",
                    All,
                    Topic,
                    PatternType::Literal,
                    "*",
                    Permission::Allow,
                ),
                rule(
                    "User:alice",
                    Write,
                    Topic,
                    PatternType::Literal,
                    "audit",
                    Permission::Deny,
                ),
            ],
            vec![],
            false,
        );
        assert!(!a.authorize(&alice(), Write, Topic, "audit"));
        assert!(a.authorize(&alice(), Read, Topic, "audit"));
        assert!(a.authorize(&alice(), Describe, Topic, "audit"));
        assert!(a.authorize(&alice(), Write, Topic, "other"));
    }

    #[test]
    fn no_rule_on_a_resource_falls_back_to_the_switch() {
        let rules = vec![rule(
            "User:bob",
            Read,
            Topic,
            PatternType::Literal,
            "x",
            Permission::Allow,
        )];
        let closed = Authorizer::new(rules.clone(), vec![], false);
        let open = Authorizer::new(rules, vec![], true);
        assert!(!closed.authorize(&alice(), Read, Topic, "y"));
        assert!(open.authorize(&alice(), Read, Topic, "y"));
        // A rule on the resource (for someone else) closes it even when the switch is on.
        assert!(!open.authorize(&alice(), Read, Topic, "x"));
    }

    #[test]
    fn hosts_and_super_users() {
        let mut r = rule(
            "User:alice",
            Read,
            Group,
            PatternType::Literal,
            "g",
            Permission::Allow,
        );
        r.host = "10.0.0.2".into();
        let a = Authorizer::new(vec![r], vec!["User:admin".into()], false);
        assert!(!a.authorize(&alice(), Read, Group, "g"));
        let elsewhere = Subject::new(Some("alice"), "10.0.0.2".parse().unwrap());
        assert!(a.authorize(&elsewhere, Read, Group, "g"));
        let admin = Subject::new(Some("admin"), "10.0.0.9".parse().unwrap());
        assert!(a.authorize(&admin, Alter, Cluster, CLUSTER_NAME));
        let anon = Subject::new(None, "10.0.0.9".parse().unwrap());
        assert_eq!(anon.principal, "User:ANONYMOUS");
    }

    #[test]
    fn names_parse_loosely_and_bits_match_kafka_codes() {
        assert_eq!(
            ResourceType::parse("transactional-id"),
            Some(TransactionalId)
        );
        assert_eq!(ResourceType::parse("TOPIC"), Some(Topic));
        assert_eq!(Operation::parse("describe_configs"), Some(DescribeConfigs));
        assert_eq!(Operation::parse("nope"), None);
        let a = Authorizer::new(
            vec![rule(
                "User:alice",
                Read,
                Topic,
                PatternType::Literal,
                "t",
                Permission::Allow,
            )],
            vec![],
            false,
        );
        // READ (3) and the DESCRIBE (8) it implies.
        assert_eq!(
            a.authorized_operations(&alice(), Topic, "t"),
            (1 << 3) | (1 << 8)
        );
    }

    #[test]
    fn idempotent_producers_need_some_uncovered_write_and_mapped_ipv4_is_ipv4() {
        use PatternType::{Literal, Prefixed};
        let covered = Authorizer::new(
            vec![
                rule(
                    "User:alice",
                    Write,
                    Topic,
                    Prefixed,
                    "orders.",
                    Permission::Allow,
                ),
                rule(
                    "User:alice",
                    Write,
                    Topic,
                    Prefixed,
                    "orders",
                    Permission::Deny,
                ),
            ],
            vec![],
            false,
        );
        assert!(!covered.may_write_some_topic(&alice()));
        let one = Authorizer::new(
            vec![rule(
                "User:alice",
                Write,
                Topic,
                Literal,
                "t",
                Permission::Allow,
            )],
            vec![],
            false,
        );
        assert!(one.may_write_some_topic(&alice()));
        assert!(Authorizer::new(vec![], vec![], true).may_write_some_topic(&alice()));
        assert!(!Authorizer::closed(vec![]).may_write_some_topic(&alice()));

        let mut r = rule("User:alice", Read, Group, Literal, "g", Permission::Allow);
        r.host = "10.0.0.1".into();
        let a = Authorizer::new(vec![r], vec![], false);
        let mapped = Subject::new(Some("alice"), "::ffff:10.0.0.1".parse().unwrap());
        assert!(a.authorize(&mapped, Read, Group, "g"));
    }
}
