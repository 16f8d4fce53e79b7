//! Authorization (issue 13, part 3): every client principal gets what its ACLs allow, and
//! Kafka's own error codes otherwise, through real clients (librdkafka via confluent-kafka,
//! the Java console and admin tools). Upstream sees only shardgate's principal, so each
//! refusal here is shardgate's.
//!
//! Principals (SCRAM-SHA-256 on the test's own instance):
//! - alice writes `authz-*` topics (WRITE implies DESCRIBE; enough for idempotence, KIP-679);
//! - bob reads `authz-*` topics and `bob-*` groups, creates `authz-bob-*` topics, and is
//!   denied READ on `authz-secret*` (a DENY wins over the prefix's ALLOW);
//! - carol may only DESCRIBE two topics (and use one group, to show a fetch refused);
//! - admin is a super user.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const USERS: [(&str, &str); 4] = [
    ("alice", "alice-authz-pw-41c9"),
    ("bob", "bob-authz-pw-9e2d"),
    ("carol", "carol-authz-pw-77af"),
    ("admin", "admin-authz-pw-03b8"),
];
const CLIENT: &str = "127.0.0.1:29188";
const ADMIN: &str = "127.0.0.1:29288";

fn password(user: &str) -> &'static str {
    USERS.iter().find(|(u, _)| *u == user).unwrap().1
}

/// A credentials file for USERS (SCRAM-SHA-256).
fn credentials_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("authz-users.toml");
    write_credentials(&path, &USERS, &["--mechanism", "SCRAM-SHA-256"]);
    path
}

/// Runs authz.py steps as `user`; the answer of each step.
fn as_user(user: &str, steps: &[String]) -> Value {
    let out = run(
        std::process::Command::new(python())
            .arg(repo().join("integration/clients/py/authz.py"))
            .args(["--brokers", CLIENT, "--user", user])
            .args(steps)
            .env("KCLIENT_PASSWORD", password(user))
            .env("RF", rf().to_string()),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "authz.py as {user} {steps:?}: {e}: {text}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Checks each (step, expected) of `user`: "OK", "OK:<detail>" or an error name the answer
/// contains.
fn expect(user: &str, cases: &[(String, &str)]) -> Value {
    let steps: Vec<String> = cases.iter().map(|(s, _)| s.clone()).collect();
    let got = as_user(user, &steps);
    let mut wrong = Vec::new();
    for (step, want) in cases {
        let answer = got[step.as_str()].as_str().unwrap_or("<none>").to_string();
        let ok = if want.starts_with("OK") {
            answer == *want || (*want == "OK" && answer.starts_with("OK"))
        } else {
            answer.split(',').any(|a| a == *want)
        };
        if !ok {
            wrong.push(format!("{user} {step}: want {want}, got {answer}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    got
}

fn listed(answer: &Value, step: &str) -> Vec<String> {
    let s = answer[step].as_str().unwrap_or_default();
    s.strip_prefix("OK:")
        .unwrap_or_else(|| panic!("{step}: {s}"))
        .split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
#[ignore = "needs the testbed"]
fn each_principal_gets_what_its_acls_allow_and_kafkas_error_codes_otherwise() {
    let dir = cache().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let creds = credentials_file(&dir);
    let t = unique("authz-t");
    let secret = unique("authz-secret");
    let other = unique("other-authz");
    let managed = unique("authz-m");
    let extra = format!(
        r#"
[listener.sasl]
mechanisms = ["SCRAM-SHA-256"]
credentials = "{}"

[authorization]
enabled = true
super_users = ["User:admin"]

[[authorization.acls]]
principal = "User:alice"
operations = ["Write"]
resource_type = "Topic"
resource_name = "authz-"
pattern_type = "prefixed"

[[authorization.acls]]
principal = "User:bob"
operations = ["Read"]
resource_type = "Topic"
resource_name = "authz-"
pattern_type = "prefixed"

[[authorization.acls]]
principal = "User:bob"
operations = ["Read"]
resource_type = "Group"
resource_name = "bob-"
pattern_type = "prefixed"

[[authorization.acls]]
principal = "User:bob"
operations = ["Create"]
resource_type = "Topic"
resource_name = "authz-bob-"
pattern_type = "prefixed"

[[authorization.acls]]
principal = "User:bob"
operations = ["Read"]
resource_type = "Topic"
resource_name = "authz-secret"
pattern_type = "prefixed"
permission = "deny"

[[authorization.acls]]
principal = "User:carol"
operations = ["Describe"]
resource_type = "Topic"
resource_name = "{t}"

[[authorization.acls]]
principal = "User:carol"
operations = ["Read"]
resource_type = "Group"
resource_name = "carol-f"

[[authorization.acls]]
principal = "User:carol"
operations = ["Describe"]
resource_type = "Topic"
resource_name = "{managed}"
"#,
        creds.display()
    );
    let _sg = own_instance("authz", CLIENT, ADMIN, "", &extra);
    let admin_url = format!("http://{ADMIN}");
    let rf_arg = rf().to_string();
    for (topic, parts) in [(&t, "3"), (&secret, "1"), (&other, "1")] {
        create_topic_direct(
            topic,
            &["--partitions", parts, "--replication-factor", &rf_arg],
        );
    }
    let (code, body) = shardgate::admin::http_request(
        &admin_url,
        "POST",
        "/api/v1/topics",
        Some(
            &serde_json::json!({
                "name": managed, "route_by": ["key"], "initial_shards": 2, "pool": 4,
                "replication_factor": rf(), "autoscale": {"enabled": false}
            })
            .to_string(),
        ),
    )
    .unwrap();
    assert_eq!(code, 201, "managed topic: {body}");
    let bob_topic = unique("authz-bob");
    let s = |x: &str| x.to_string();

    // alice: writes, plain and idempotent, and to a managed topic; nothing else.
    let alice = expect(
        "alice",
        &[
            (format!("produce:{t}:20"), "OK:20"),
            (format!("idempotent:{t}:10"), "OK:10"),
            (format!("produce:{managed}:20"), "OK:20"),
            (format!("produce:{other}:1"), "TOPIC_AUTHORIZATION_FAILED"),
            (s("create:authz-alice-new"), "TOPIC_AUTHORIZATION_FAILED"),
            (format!("acl:{t}"), "CLUSTER_AUTHORIZATION_FAILED"),
            (
                format!("delete_records:{t}:1"),
                "TOPIC_AUTHORIZATION_FAILED",
            ),
            (format!("configs:{t}"), "TOPIC_AUTHORIZATION_FAILED"),
            (format!("describe:{other}"), "TOPIC_AUTHORIZATION_FAILED"),
            (s("topics:"), "OK"),
        ],
    );
    let seen = listed(&alice, "topics:");
    assert!(
        seen.contains(&t) && seen.contains(&secret) && seen.contains(&managed),
        "{seen:?}"
    );
    assert!(
        !seen.contains(&other),
        "alice may not describe {other}: {seen:?}"
    );

    // bob: reads in his groups, creates his topics; the DENY on authz-secret wins.
    let bob = expect(
        "bob",
        &[
            (format!("produce:{t}:1"), "TOPIC_AUTHORIZATION_FAILED"),
            (format!("consume:{t}:bob-g:30"), "OK:30"),
            (format!("consume:{managed}:bob-m:20"), "OK:20"),
            (format!("consume:{t}:eve-g:1"), "GROUP_AUTHORIZATION_FAILED"),
            (
                format!("fetch:{secret}:1:bob-f"),
                "TOPIC_AUTHORIZATION_FAILED",
            ),
            (format!("describe:{other}"), "TOPIC_AUTHORIZATION_FAILED"),
            (format!("create:{bob_topic}"), "OK"),
            (format!("delete:{bob_topic}"), "TOPIC_AUTHORIZATION_FAILED"),
            (s("groups:bob-"), "OK"),
            (s("topics:"), "OK"),
        ],
    );
    assert!(listed(&bob, "groups:bob-").contains(&s("bob-g")), "{bob}");
    let seen = listed(&bob, "topics:");
    assert!(
        seen.contains(&t) && seen.contains(&bob_topic) && !seen.contains(&other),
        "{seen:?}"
    );

    // carol: may see two topics, do nothing with them, and see no group.
    let carol = expect(
        "carol",
        &[
            (format!("produce:{t}:1"), "TOPIC_AUTHORIZATION_FAILED"),
            (format!("produce:{managed}:1"), "TOPIC_AUTHORIZATION_FAILED"),
            (format!("fetch:{t}:3:carol-f"), "TOPIC_AUTHORIZATION_FAILED"),
            (s("describe_group:bob-g"), "GROUP_AUTHORIZATION_FAILED"),
            (s("groups:"), "OK"),
            (s("topics:"), "OK"),
        ],
    );
    assert!(!listed(&carol, "groups:").contains(&s("bob-g")), "{carol}");
    let mut seen = listed(&carol, "topics:");
    seen.retain(|x| [&t, &secret, &other, &managed, &bob_topic].contains(&x));
    seen.sort();
    let mut want = vec![t.clone(), managed.clone()];
    want.sort();
    assert_eq!(seen, want, "carol sees only what she may describe");

    // admin (super user): everything shardgate's own principal may do, cluster changes too
    // (the testbed's Kafka has no authorizer: its own answer to CreateAcls comes back).
    expect(
        "admin",
        &[
            (format!("describe:{other}"), "OK"),
            (format!("delete:{bob_topic}"), "OK"),
            (format!("configs:{t}"), "OK"),
            (format!("alter_configs:{t}"), "OK"),
            (format!("delete_records:{t}:1"), "OK:1"),
            (format!("acl:{t}"), "SECURITY_DISABLED"),
        ],
    );

    // The Java client gets the same refusal (its own exception for GROUP_AUTHORIZATION_FAILED).
    let props = dir.join("authz-carol.properties");
    std::fs::write(
        &props,
        format!(
            "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-256\nsasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"carol\" password=\"{}\";\n",
            password("carol")
        ),
    )
    .unwrap();
    let out = run(
        std::process::Command::new(bin("kafka-console-consumer"))
            .args([
                "--bootstrap-server",
                CLIENT,
                "--topic",
                &t,
                "--group",
                "eve-g",
            ])
            .args([
                "--from-beginning",
                "--max-messages",
                "1",
                "--timeout-ms",
                "20000",
            ])
            .arg("--consumer.config")
            .arg(&props),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GroupAuthorizationException"),
        "Java consumer as carol: {stderr}"
    );

    // Refusals are counted per API.
    let denied = |api: &str| {
        metric_of(
            &admin_url,
            "shardgate_authorization_denied_total",
            &[&format!("api=\"{api}\"")],
        )
    };
    for api in [
        "Produce",
        "Fetch",
        "Metadata",
        "CreateTopics",
        "DeleteTopics",
    ] {
        assert!(denied(api) >= 1.0, "no refusal of {api} counted");
    }
    let log = std::fs::read_to_string(dir.join("authz.log")).unwrap();
    assert!(
        log.contains("request denied by authorization rules") && log.contains("User:carol"),
        "refusals are logged with the principal"
    );
    for (_, pw) in USERS {
        assert!(!log.contains(pw), "a password reached the log");
    }
}

#[test]
#[ignore = "needs the testbed"]
fn clients_cannot_change_the_real_clusters_acls_or_delete_records_by_default() {
    // The testbed's shardgate: no SASL, no [authorization]; every client would act as
    // shardgate's principal upstream.
    let topic = unique("authz-default");
    create_topic(&topic, 1);
    let out = run(
        std::process::Command::new(bin("kafka-acls")).args([
            "--bootstrap-server",
            &proxy(),
            "--add",
            "--allow-principal",
            "User:mallory",
            "--operation",
            "All",
            "--topic",
            "*",
        ]),
        Duration::from_secs(120),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("ClusterAuthorizationException"), "{all}");

    let offsets = cache().join("run").join("authz-delete-records.json");
    std::fs::write(
        &offsets,
        format!(r#"{{"partitions":[{{"topic":"{topic}","partition":0,"offset":0}}],"version":1}}"#),
    )
    .unwrap();
    let out = run(
        std::process::Command::new(bin("kafka-delete-records"))
            .args(["--bootstrap-server", &proxy(), "--offset-json-file"])
            .arg(&offsets),
        Duration::from_secs(120),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("TopicAuthorizationException"), "{all}");
    assert!(
        metric(
            "shardgate_authorization_denied_total",
            &["api=\"CreateAcls\""]
        ) >= 1.0
    );
    assert!(
        metric(
            "shardgate_authorization_denied_total",
            &["api=\"DeleteRecords\""]
        ) >= 1.0
    );
}
