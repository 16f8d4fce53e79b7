//! Security (issue 13): who may use the admin API. Needs the testbed with Consul (`up
//! --consul`, as `integration/run-tests` does): the test starts two instances of its own
//! sharing a shard store there, both with an operator and a read token.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const OPS: &str = "ops-token-0123456789abcdef-security-test";
const VIEWER: &str = "viewer-token-fedcba9876543210-security-test";

fn call(base: &str, method: &str, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
    let text = (!body.is_null()).then(|| body.to_string());
    let (code, text) =
        shardgate::admin::http_request_as(base, method, path, text.as_deref(), token).unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Which of two instances leads (elected through Consul), once exactly one says so.
fn single_leader(leads: impl Fn(usize) -> bool) -> usize {
    let started = Instant::now();
    loop {
        let lead: Vec<usize> = (0..2).filter(|&i| leads(i)).collect();
        if let [i] = lead.as_slice() {
            return *i;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no single leader: {lead:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Instance `n` of 2 (client 127.0.0.1:2917n, admin 127.0.0.1:2927n) on the testbed's
/// Consul, cluster `cluster`, with `admin` as its [admin] section.
fn instance_config(n: i32, cluster: &str, admin: &str) -> String {
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"
[listener]
bind = "127.0.0.1:{c}"
node_id = {n}

[[instances]]
node_id = 1
advertised = "127.0.0.1:29171"

[[instances]]
node_id = 2
advertised = "127.0.0.1:29172"

[upstream]
bootstrap = [{bootstrap}]

{admin}

[store]
kind = "consul"
consul_addr = "{consul}"
cluster = "{cluster}"
"#,
        c = 29170 + n,
        bootstrap = bootstrap.join(", "),
        consul = var("CONSUL_HTTP_ADDR", "http://127.0.0.1:28500"),
    )
}

/// Two instances with an operator token ("ops", which each also presents when it forwards to
/// the leader) and a read token ("viewer"). Without a token or with a wrong one every API call
/// is refused (401, counted), health and metrics stay open; the read token reads maps, load and
/// consumers but cannot create a managed topic or split (403); the operator token can, also
/// through the instance that is not the leader (forwarded with that instance's own token: the
/// caller's is not passed on). A configuration binding the admin API beyond loopback without
/// tokens is refused at start, naming the key.
#[test]
#[ignore = "needs the testbed with Consul: integration/run-tests"]
fn the_admin_api_asks_for_a_token_with_the_right_role_and_instances_forward_with_their_own() {
    // Refused at start: an open admin API reachable from other hosts.
    let dir = cache().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let open = dir.join("security-open-admin.toml");
    std::fs::write(
        &open,
        instance_config(1, "x", "[admin]\nbind = \"0.0.0.0:29271\""),
    )
    .unwrap();
    let out = run(
        std::process::Command::new(
            std::env::var("SHARDGATE_BIN")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|_| repo().join("target/debug/shardgate")),
        )
        .args(["check-config", "--config"])
        .arg(&open),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "check-config: {stderr}");
    assert!(
        stderr.contains("admin.bind") && stderr.contains("admin.tokens"),
        "the refusal names the key and the fix: {stderr}"
    );

    let cluster = unique("security");
    let admin_section = |n: i32| {
        format!(
            "[admin]\nbind = \"127.0.0.1:{}\"\nforward_with = \"ops\"\n\n[[admin.tokens]]\nname = \"ops\"\nrole = \"operator\"\nenv = \"SHARDGATE_TEST_OPS_TOKEN\"\n\n[[admin.tokens]]\nname = \"viewer\"\nrole = \"read\"\nvalue = \"{VIEWER}\"\n",
            29270 + n
        )
    };
    // The operator token comes from the environment (the file holds only its name).
    // SAFETY: set before any instance is spawned; the test's threads do not read it.
    unsafe { std::env::set_var("SHARDGATE_TEST_OPS_TOKEN", OPS) };
    let bases: Vec<String> = (1..=2)
        .map(|n| format!("http://127.0.0.1:{}", 29270 + n))
        .collect();
    let _instances: Vec<Shardgate> = (1..=2)
        .map(|n| {
            start_shardgate(
                &dir,
                &format!("security-{n}"),
                &instance_config(n, &cluster, &admin_section(n)),
                &bases[n as usize - 1],
            )
        })
        .collect();
    // Which one leads (elected through Consul).
    let leader = single_leader(|i| metric_of(&bases[i], "shardgate_controller_leader", &[]) == 1.0);
    let follower = 1 - leader;
    let (lb, fb) = (&bases[leader], &bases[follower]);

    // Open: probes and (admin.public_metrics defaults to true) metrics; the shard page's HTML.
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let (code, _) = call(lb, "GET", path, &Value::Null, None);
        assert_eq!(code, 200, "GET {path} without a token");
    }

    let topic = unique("secured");
    let create = serde_json::json!({
        "name": topic, "route_by": ["key"], "initial_shards": 2, "pool": 4,
        "replication_factor": rf()
    });
    let failures = |reason: &str| {
        metric_of(
            lb,
            "shardgate_admin_auth_failures_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    let (missing0, invalid0, forbidden0) = (
        failures("missing"),
        failures("invalid"),
        failures("forbidden"),
    );

    // No token, a wrong one: 401 on reads and changes alike.
    for (method, path, body) in [
        ("GET", "/api/v1/topics".to_string(), Value::Null),
        ("GET", "/api/v1/consumers".to_string(), Value::Null),
        ("POST", "/api/v1/topics".to_string(), create.clone()),
    ] {
        let (code, resp) = call(lb, method, &path, &body, None);
        assert_eq!(code, 401, "{method} {path} without a token: {resp}");
        let (code, resp) = call(lb, method, &path, &body, Some("not-the-token-0123456789"));
        assert_eq!(code, 401, "{method} {path} with a wrong token: {resp}");
    }
    let (code, resp) = call(
        lb,
        "GET",
        "/api/v1/topics",
        &Value::Null,
        Some(&OPS[..OPS.len() - 1]),
    );
    assert_eq!(code, 401, "a token's prefix is not the token: {resp}");

    // The read token reads, and cannot change anything.
    let (code, resp) = call(lb, "GET", "/api/v1/topics", &Value::Null, Some(VIEWER));
    assert_eq!(code, 200, "read token, GET topics: {resp}");
    let (code, resp) = call(lb, "GET", "/api/v1/consumers", &Value::Null, Some(VIEWER));
    assert_eq!(code, 200, "read token, GET consumers: {resp}");
    let (code, resp) = call(lb, "POST", "/api/v1/topics", &create, Some(VIEWER));
    assert_eq!(code, 403, "read token, POST topics: {resp}");
    let (code, resp) = call(fb, "POST", "/api/v1/topics", &create, Some(VIEWER));
    assert_eq!(code, 403, "read token on the follower, POST topics: {resp}");

    // The operator token, through the follower: forwarded to the leader with the follower's
    // own credential (the leader refuses requests without one, as seen above).
    let (code, resp) = call(fb, "POST", "/api/v1/topics", &create, Some(OPS));
    assert_eq!(code, 201, "operator token through the follower: {resp}");
    let shards = format!("/api/v1/topics/{topic}/shards");
    let active_on = |base: &str| {
        let (code, map) = call(base, "GET", &shards, &Value::Null, Some(VIEWER));
        (code == 200).then(|| active(&map))
    };
    // The follower learns the new map from the store.
    eventually("the follower has the map", Duration::from_secs(20), || {
        active_on(fb).is_some_and(|a| a.len() == 2)
    });
    let shard = active_on(lb).unwrap()[0]["id"].as_u64().unwrap();
    let split = format!("/api/v1/topics/{topic}/shards/{shard}/split");
    let (code, resp) = call(fb, "POST", &split, &Value::Null, Some(VIEWER));
    assert_eq!(code, 403, "read token, split: {resp}");
    let (code, resp) = call(fb, "POST", &split, &Value::Null, Some(OPS));
    assert_eq!(
        code, 200,
        "operator token through the follower, split: {resp}"
    );
    eventually(
        "3 active shards on the follower",
        Duration::from_secs(20),
        || active_on(fb).is_some_and(|a| a.len() == 3),
    );
    // The load endpoint, asked of the follower, answers with the leader's samples.
    let (code, load) = call(
        fb,
        "GET",
        &format!("/api/v1/topics/{topic}/load"),
        &Value::Null,
        Some(VIEWER),
    );
    assert_eq!(code, 200, "load through the follower: {load}");
    assert_eq!(
        load["shards"].as_array().map(Vec::len),
        Some(3),
        "load through the follower: {load}"
    );

    // Every refusal was counted on the leader, by reason.
    assert!(
        failures("missing") >= missing0 + 3.0,
        "missing-token refusals counted"
    );
    assert!(
        failures("invalid") >= invalid0 + 4.0,
        "invalid-token refusals counted"
    );
    assert!(
        failures("forbidden") >= forbidden0 + 1.0,
        "read-role refusals counted"
    );
    println!(
        "admin tokens: leader instance {}, refusals counted missing {} invalid {} forbidden {} (leader); create and split through the follower with an operator token answered 201 and 200",
        leader + 1,
        failures("missing") - missing0,
        failures("invalid") - invalid0,
        failures("forbidden") - forbidden0,
    );
}

/// The admin API over HTTPS (`[admin.tls]`, the testbed CA's certificate for 127.0.0.1): two
/// instances on Consul advertise `https://` admin addresses, the follower forwards a create and
/// a split to the leader over HTTPS with its own token, the CLI reaches it with `--ca`, and a
/// plain-HTTP request or a client that does not trust the CA gets nothing (counted).
#[test]
#[ignore = "needs the testbed with Consul: integration/run-tests"]
fn the_admin_api_serves_https_and_instances_forward_to_the_leader_over_it() {
    let dir = cache().join("run");
    let tls = dir.join("tls");
    let trust = shardgate::http::Trust::from_pem("ca", &tls.join("ca.pem")).unwrap();
    let cluster = unique("security-https");
    let admin_section = |n: i32| {
        format!(
            "[admin]\nbind = \"127.0.0.1:{}\"\nforward_with = \"ops\"\n\n[admin.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n[[admin.tokens]]\nname = \"ops\"\nrole = \"operator\"\nvalue = \"{OPS}\"\n\n[[admin.tokens]]\nname = \"viewer\"\nrole = \"read\"\nvalue = \"{VIEWER}\"\n",
            29270 + n,
            tls.join("cert.pem").display(),
            tls.join("key.pem").display(),
            tls.join("ca.pem").display(),
        )
    };
    let bases: Vec<String> = (1..=2)
        .map(|n| format!("https://127.0.0.1:{}", 29270 + n))
        .collect();
    let https = |base: &str, method: &str, path: &str, body: Option<&str>, token: Option<&str>| {
        let (code, text) =
            shardgate::admin::http_request_tls(base, method, path, body, token, Some(&trust))
                .unwrap_or((0, String::new()));
        (
            code,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
        )
    };
    let metric_https = |base: &str, name: &str| {
        let (_, body) = https(base, "GET", "/metrics", None, None);
        body.as_str()
            .unwrap_or("")
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let _instances: Vec<Shardgate> = (1..=2)
        .map(|n| {
            let name = format!("security-https-{n}");
            let sg = spawn_shardgate(
                &dir,
                &name,
                &instance_config(n, &cluster, &admin_section(n)),
            );
            eventually(&format!("{name} ready"), Duration::from_secs(60), || {
                https(&bases[n as usize - 1], "GET", "/readyz", None, None).0 == 200
            });
            sg
        })
        .collect();
    let leader = single_leader(|i| metric_https(&bases[i], "shardgate_controller_leader") == 1.0);
    let (lb, fb) = (&bases[leader], &bases[1 - leader]);

    // Plain HTTP to the HTTPS port, and HTTPS without the CA: no answer; both counted.
    let before = metric_https(lb, "shardgate_admin_tls_failures_total");
    let plain =
        shardgate::admin::http_request(&lb.replace("https://", "http://"), "GET", "/readyz", None);
    assert!(
        plain.as_ref().is_err() || plain.as_ref().is_ok_and(|(c, _)| *c == 0),
        "plain HTTP answered: {plain:?}"
    );
    let other = shardgate::http::Trust::from_pem("ca", &tls.join("client.pem")).unwrap();
    let untrusted =
        shardgate::admin::http_request_tls(lb, "GET", "/readyz", None, None, Some(&other));
    assert!(
        untrusted.is_err(),
        "a client not trusting the CA got {untrusted:?}"
    );
    eventually("TLS failures counted", Duration::from_secs(5), || {
        metric_https(lb, "shardgate_admin_tls_failures_total") >= before + 2.0
    });

    // Tokens still apply; the follower forwards over HTTPS with its own.
    let topic = unique("https-managed");
    let create = serde_json::json!({
        "name": topic, "route_by": ["key"], "initial_shards": 2, "pool": 4,
        "replication_factor": rf()
    })
    .to_string();
    let (code, resp) = https(fb, "POST", "/api/v1/topics", Some(&create), None);
    assert_eq!(code, 401, "no token over HTTPS: {resp}");
    let (code, resp) = https(fb, "POST", "/api/v1/topics", Some(&create), Some(VIEWER));
    assert_eq!(code, 403, "read token over HTTPS: {resp}");
    let (code, resp) = https(fb, "POST", "/api/v1/topics", Some(&create), Some(OPS));
    assert_eq!(code, 201, "create through the follower over HTTPS: {resp}");
    let shards = format!("/api/v1/topics/{topic}/shards");
    eventually("the follower has the map", Duration::from_secs(20), || {
        https(fb, "GET", &shards, None, Some(VIEWER)).0 == 200
    });
    let (_, map) = https(fb, "GET", &shards, None, Some(VIEWER));
    let shard = active(&map)[0]["id"].as_u64().unwrap();
    let (code, resp) = https(
        fb,
        "POST",
        &format!("/api/v1/topics/{topic}/shards/{shard}/split"),
        None,
        Some(OPS),
    );
    assert_eq!(code, 200, "split through the follower over HTTPS: {resp}");

    // The CLI: with --ca it lists the map (3 active shards), without it it says why.
    let bin = std::env::var("SHARDGATE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/debug/shardgate"));
    let cli = |with_ca: bool| {
        let mut c = std::process::Command::new(&bin);
        c.args(["shards", "--admin", fb.as_str()])
            .env("SHARDGATE_ADMIN_TOKEN", VIEWER);
        if with_ca {
            c.arg("--ca").arg(tls.join("ca.pem"));
        }
        c.args(["list", topic.as_str()]);
        run(&mut c, Duration::from_secs(20))
    };
    eventually(
        "the CLI sees 3 active shards",
        Duration::from_secs(20),
        || {
            let out = cli(true);
            let text = String::from_utf8_lossy(&out.stdout);
            out.status.success()
                && serde_json::from_str::<Value>(&text).is_ok_and(|m| active(&m).len() == 3)
        },
    );
    let out = cli(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("CA"),
        "the CLI without --ca: {stderr}"
    );
    println!(
        "admin HTTPS: leader instance {}, create and split forwarded over HTTPS answered 201 and 200; plain HTTP and an untrusting client refused and counted; the CLI works with --ca",
        leader + 1
    );
}

// ---------------------------------------------------------------------------------------
// SASL on the client listener

const ALICE_PW: &str = "alice-pw-7f3a9c1e";
const BOB_PW: &str = "bob-pw-2b8d4e6f";

/// A credentials file for alice and bob written by `shardgate credentials` (password on
/// standard input).
fn credentials_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("users.toml");
    write_credentials(&path, &[("alice", ALICE_PW), ("bob", BOB_PW)], &[]);
    path
}

/// An instance of the test's own with `sasl` (and `tls`) as its listener's sections.
fn sasl_instance(n: u16, dir: &std::path::Path, sections: &str) -> (Shardgate, String, String) {
    let (client, admin) = (
        format!("127.0.0.1:{}", 29170 + n),
        format!("127.0.0.1:{}", 29270 + n),
    );
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let config = format!(
        "[listener]\nbind = \"{client}\"\n{sections}\n[upstream]\nbootstrap = [{}]\n[admin]\nbind = \"{admin}\"\n[store]\npath = \"{}\"\n",
        bootstrap.join(", "),
        dir.join(format!("data-{n}")).display()
    );
    let admin_url = format!("http://{admin}");
    let sg = start_shardgate(dir, &format!("sasl-{n}"), &config, &admin_url);
    (sg, client, admin_url)
}

/// Metadata v1 on `s`: whether an answer came (false: the connection was closed).
fn metadata_answered(s: &mut std::net::TcpStream, correlation_id: i32) -> bool {
    use std::io::Write as _;
    let req = kafka_protocol::messages::MetadataRequest::default();
    if s.write_all(&frame(
        kafka_protocol::messages::ApiKey::Metadata,
        1,
        correlation_id,
        &req,
    ))
    .is_err()
    {
        return false;
    }
    read_frame(s).is_ok()
}

/// Clients authenticate to shardgate with SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN
/// (confluent-kafka and kafka-python; credentials written by `shardgate credentials`, never
/// a password in the file), also over TLS (SASL_SSL), and produce and consume through it.
/// Refused, each closed and counted: a wrong password or unknown user, a mechanism the
/// listener does not offer, a SASL client on a listener without SASL, a request before
/// authenticating; an address with too many failures is refused even with the right
/// password. KIP-368: clients re-authenticate within the session lifetime and keep working; a
/// connection that does not is closed at its next request. No password reaches the log.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn clients_authenticate_with_scram_or_plain_and_everything_else_is_refused() {
    let dir = cache().join("run").join("sasl-test");
    std::fs::create_dir_all(&dir).unwrap();
    let creds = credentials_file(&dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run_ok(
        std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(60),
    );
    let sasl = |mechs: &str, extra: &str| {
        format!(
            "[listener.sasl]\nmechanisms = [{mechs}]\ncredentials = \"{}\"\n{extra}",
            creds.display()
        )
    };
    // A: everything offered, re-authentication every 3 s. B: TLS + SCRAM-SHA-512 only.
    // C: for failures (its limit: 3 a minute per address).
    let (_a, a, a_admin) = sasl_instance(
        3,
        &dir,
        &sasl(
            "\"SCRAM-SHA-256\", \"SCRAM-SHA-512\", \"PLAIN\"",
            "session_lifetime_ms = 3000",
        ),
    );
    let (_b, b, _) = sasl_instance(
        4,
        &dir,
        &format!(
            "[listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n{}",
            cert.display(),
            key.display(),
            sasl("\"SCRAM-SHA-512\"", "")
        ),
    );
    let (_c, c, c_admin) = sasl_instance(
        5,
        &dir,
        &sasl(
            "\"SCRAM-SHA-256\", \"PLAIN\"",
            "max_failures_per_minute = 3",
        ),
    );

    // Round trips through A with each mechanism, and through B over TLS.
    let ca = cert.to_str().unwrap().to_string();
    let cases: Vec<(&str, &str, String, Vec<String>)> = vec![
        ("confluent", "SCRAM-SHA-256", a.clone(), vec![]),
        ("confluent", "SCRAM-SHA-512", a.clone(), vec![]),
        ("confluent", "PLAIN", a.clone(), vec![]),
        ("kafka-python", "SCRAM-SHA-256", a.clone(), vec![]),
        ("kafka-python", "PLAIN", a.clone(), vec![]),
        (
            "confluent",
            "SCRAM-SHA-512",
            b.clone(),
            vec!["--ca".into(), ca.clone()],
        ),
        (
            "kafka-python",
            "SCRAM-SHA-512",
            b.clone(),
            vec!["--ca".into(), ca.clone()],
        ),
    ];
    for (lib, mech, addr, tls) in &cases {
        let topic = unique("sasl");
        create_topic_direct(&topic, &["--partitions", "2", "--replication-factor", "1"]);
        let mut sec: Vec<&str> = tls.iter().map(String::as_str).collect();
        sec.extend(["--sasl", mech, "--user", "alice"]);
        let p = kclient(
            lib,
            &sec,
            ALICE_PW,
            &[
                "produce",
                "--brokers",
                addr,
                "--topic",
                &topic,
                "--count",
                "20",
            ],
        );
        assert_eq!(p["acked"], 20, "{lib} {mech} via {addr}: produce {p}");
        let group = unique("sasl-g");
        let r = kclient(
            lib,
            &sec,
            ALICE_PW,
            &[
                "consume",
                "--brokers",
                addr,
                "--topic",
                &topic,
                "--group",
                &group,
                "--count",
                "20",
                "--timeout",
                "60",
            ],
        );
        assert_eq!(r["consumed"], 20, "{lib} {mech} via {addr}: consume {r}");
    }

    // Kafka's own Java console tools, SCRAM-SHA-512 through a JAAS config.
    let topic = unique("sasl-java");
    create_topic_direct(&topic, &["--partitions", "1", "--replication-factor", "1"]);
    let props = dir.join("java-client.properties");
    std::fs::write(
        &props,
        format!(
            "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"bob\" password=\"{BOB_PW}\";\n"
        ),
    )
    .unwrap();
    let mut producer = std::process::Command::new(bin("kafka-console-producer"))
        .args([
            "--bootstrap-server",
            &a,
            "--topic",
            &topic,
            "--producer.config",
        ])
        .arg(&props)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = producer.stdin.take().unwrap();
        for i in 0..5 {
            writeln!(stdin, "java-{i}").unwrap();
        }
    }
    let out = producer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Java console producer with SCRAM-SHA-512: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = run_ok(
        std::process::Command::new(bin("kafka-console-consumer"))
            .args([
                "--bootstrap-server",
                &a,
                "--topic",
                &topic,
                "--from-beginning",
            ])
            .args([
                "--max-messages",
                "5",
                "--timeout-ms",
                "60000",
                "--consumer.config",
            ])
            .arg(&props),
        Duration::from_secs(120),
    );
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(
        lines,
        ["java-0", "java-1", "java-2", "java-3", "java-4"],
        "Java console consumer"
    );

    // Re-authentication (KIP-368): 40 records at 8/s (5 s, the session lasts 3 s).
    let reauth0 = metric_of(
        &a_admin,
        "shardgate_sasl_authentications_total",
        &["result=\"reauthenticated\""],
    );
    let topic = unique("sasl-reauth");
    create_topic_direct(&topic, &["--partitions", "1", "--replication-factor", "1"]);
    let sec = ["--sasl", "SCRAM-SHA-512", "--user", "bob"];
    let p = kclient(
        "confluent",
        &sec,
        BOB_PW,
        &[
            "produce",
            "--brokers",
            &a,
            "--topic",
            &topic,
            "--count",
            "40",
            "--rate",
            "8",
        ],
    );
    assert_eq!(p["acked"], 40, "produce across re-authentications: {p}");
    let reauth = metric_of(
        &a_admin,
        "shardgate_sasl_authentications_total",
        &["result=\"reauthenticated\""],
    ) - reauth0;
    assert!(
        reauth >= 1.0,
        "no re-authentication within 5 s of 3 s sessions"
    );
    // A connection that does not re-authenticate is closed at its first request after.
    let (lifetime, mut s) = raw_plain(&a, "alice", ALICE_PW);
    assert_eq!(lifetime, 3000, "the session lifetime is announced");
    assert!(metadata_answered(&mut s, 3), "authenticated: served");
    std::thread::sleep(Duration::from_millis(3300));
    assert!(!metadata_answered(&mut s, 4), "expired: closed");
    // A request before authenticating closes the connection; ApiVersions is answered.
    let versions: kafka_protocol::messages::ApiVersionsResponse = ask(
        &a,
        kafka_protocol::messages::ApiKey::ApiVersions,
        3,
        &kafka_protocol::messages::ApiVersionsRequest::default(),
    );
    assert!(
        versions
            .api_keys
            .iter()
            .any(|k| k.api_key == 17 && k.min_version == 1),
        "SaslHandshake v1 offered"
    );
    let mut raw = std::net::TcpStream::connect(&a).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(
        !metadata_answered(&mut raw, 1),
        "Metadata before authenticating is not served"
    );
    // Before authenticating, a frame above 512 KiB is not even read: the connection closes
    // at its length prefix (an unauthenticated peer cannot hold the memory budget).
    {
        use std::io::{Read as _, Write as _};
        let mut big = std::net::TcpStream::connect(&a).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        big.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            matches!(big.read(&mut buf), Ok(0) | Err(_)),
            "a 1 MiB frame before authentication is refused by closing"
        );
    }
    assert!(
        metric_of(
            &a_admin,
            "shardgate_sasl_failures_total",
            &["reason=\"large_frame_before_authentication\""]
        ) >= 1.0
    );

    // Refusals on C and B, and on the testbed's listener without SASL.
    let probe = |addr: &str, sec: &[&str], pw: &str| {
        kclient("confluent", sec, pw, &["probe", "--brokers", addr])
    };
    let wrong = probe(
        &c,
        &["--sasl", "SCRAM-SHA-256", "--user", "alice"],
        "not-the-password",
    );
    assert_eq!(wrong["ok"], false, "wrong password: {wrong}");
    assert!(
        wrong.to_string().contains("Authentication failed"),
        "wrong password: {wrong}"
    );
    let unsupported = probe(
        &b,
        &["--ca", &ca, "--sasl", "SCRAM-SHA-256", "--user", "alice"],
        ALICE_PW,
    );
    assert_eq!(
        unsupported["ok"], false,
        "mechanism not offered: {unsupported}"
    );
    assert!(
        unsupported.to_string().contains("SCRAM-SHA-512"),
        "the refusal lists what is offered: {unsupported}"
    );
    let main_listener = proxy().split(',').next().unwrap().to_string();
    let plaintext_listener = probe(
        &main_listener,
        &["--sasl", "PLAIN", "--user", "alice"],
        ALICE_PW,
    );
    assert_eq!(
        plaintext_listener["ok"], false,
        "SASL on a listener without it: {plaintext_listener}"
    );
    // C has seen failures from this address beyond its limit: even the right password is
    // refused now.
    let limited = probe(
        &c,
        &["--sasl", "SCRAM-SHA-256", "--user", "alice"],
        ALICE_PW,
    );
    assert_eq!(limited["ok"], false, "rate limited: {limited}");
    assert!(
        limited.to_string().contains("too many failed"),
        "rate limited: {limited}"
    );
    assert!(
        metric_of(
            &c_admin,
            "shardgate_sasl_failures_total",
            &["reason=\"rate_limited\""]
        ) >= 1.0,
        "rate-limited attempts counted"
    );
    assert!(
        metric_of(
            &c_admin,
            "shardgate_sasl_failures_total",
            &["reason=\"failed\""]
        ) >= 1.0
    );
    assert!(
        metric_of(
            &a_admin,
            "shardgate_sasl_failures_total",
            &["reason=\"unauthenticated_request\""]
        ) >= 1.0
    );
    assert!(
        metric_of(
            &a_admin,
            "shardgate_sasl_failures_total",
            &["reason=\"expired\""]
        ) >= 1.0
    );
    assert!(
        metric_of(
            &admin(),
            "shardgate_sasl_failures_total",
            &["reason=\"no_sasl_listener\""]
        ) >= 1.0
    );
    // No password in any log.
    for n in 3..=5 {
        let log = std::fs::read_to_string(dir.join(format!("sasl-{n}.log"))).unwrap();
        assert!(
            !log.contains(ALICE_PW) && !log.contains(BOB_PW),
            "a password in sasl-{n}.log"
        );
    }
    println!(
        "SASL: {} round trips (SCRAM-SHA-256/512, PLAIN; confluent-kafka and kafka-python; SASL_SSL) and one with the Java console tools (SCRAM-SHA-512), {reauth} re-authentications in 5 s of 3 s sessions; refused: wrong password, unsupported mechanism, listener without SASL, request before authentication, expired session, rate limit",
        cases.len()
    );
}

// ---------------------------------------------------------------------------------------
// shardgate's own identity towards Kafka

/// The testbed's SASL user (integration/lib.sh: UPSTREAM_SASL_USER / _PASSWORD).
const UPSTREAM_USER: &str = "shardgate";
const UPSTREAM_PW: &str = "shardgate-upstream-secret";

/// An instance whose upstream is the brokers' SASL_SSL listeners (19692..), authenticating
/// with `mechanism` and the password from `SHARDGATE_TEST_UPSTREAM_PW_<n>`.
fn upstream_sasl_instance(
    n: u16,
    dir: &std::path::Path,
    mechanism: &str,
    pw: &str,
) -> (Shardgate, String, String) {
    let var = format!("SHARDGATE_TEST_UPSTREAM_PW_{n}");
    // SAFETY: set before the instance is spawned; no other thread reads it.
    unsafe { std::env::set_var(&var, pw) };
    upstream_login_instance(
        dir,
        &format!("upstream-sasl-{n}"),
        (29170 + n, 29270 + n),
        19691,
        &format!(
            "mechanism = \"{mechanism}\"\nusername = \"{UPSTREAM_USER}\"\npassword_env = \"{var}\""
        ),
    )
}

/// shardgate authenticates to Kafka's SASL_SSL listeners as its own SCRAM-SHA-512 user; the
/// brokers end sessions after 10 s (KIP-368), and shardgate moves new requests to freshly
/// authenticated connections before that, so an idempotent producer and a consumer running
/// through it for 15 s lose nothing and see every partition in order. With a wrong password it does not become ready, and says why.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn shardgate_authenticates_upstream_as_its_own_user_and_renews_before_sessions_end() {
    let dir = cache().join("run").join("upstream-sasl-test");
    std::fs::create_dir_all(&dir).unwrap();
    let (_d, d, d_admin) = upstream_sasl_instance(6, &dir, "SCRAM-SHA-512", UPSTREAM_PW);
    eventually(
        "the SASL upstream instance ready",
        Duration::from_secs(60),
        || {
            shardgate::admin::http_request(&d_admin, "GET", "/readyz", None)
                .is_ok_and(|(c, _)| c == 200)
        },
    );
    let auths = |result: &str| {
        metric_of(
            &d_admin,
            "shardgate_upstream_sasl_authentications_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    let first = auths("ok");
    assert!(first >= 1.0, "no upstream SASL authentication counted");

    let topic = unique("upstream-sasl");
    create_topic_direct(&topic, &["--partitions", "2", "--replication-factor", "1"]);
    // 3,000 records at 200/s from an idempotent producer: 15 s, past the 10 s session of
    // every connection, with produces in flight when connections are retired (a produce on the
    // new connection overtaking one still on the old would break the producer's sequence).
    produce_and_consume_in_order(&d, &topic, 3000, 200);
    let renewed = auths("ok") - first;
    assert!(
        renewed >= 1.0,
        "no connection authenticated anew within 15 s of 10 s sessions"
    );
    assert_eq!(
        auths("failed"),
        0.0,
        "an upstream SASL authentication failed"
    );

    // A wrong password: not ready, counted, and the log says why.
    let (_e, _, e_admin) = upstream_sasl_instance(7, &dir, "SCRAM-SHA-256", "not-the-password");
    eventually("the failure counted", Duration::from_secs(30), || {
        metric_of(
            &e_admin,
            "shardgate_upstream_sasl_authentications_total",
            &["result=\"failed\""],
        ) >= 1.0
    });
    let (code, _) = shardgate::admin::http_request(&e_admin, "GET", "/readyz", None).unwrap();
    assert_ne!(code, 200, "ready with a wrong upstream password");
    let log = std::fs::read_to_string(dir.join("upstream-sasl-7.log")).unwrap();
    assert!(
        log.contains("SASL authentication to broker"),
        "the log names the cause"
    );
    assert!(
        !log.contains(UPSTREAM_PW) && !log.contains("not-the-password"),
        "a password in the log"
    );
    let waited = metric_of(&d_admin, "shardgate_produce_socket_changes_total", &[]) + 0.0;
    println!(
        "upstream SASL: SCRAM-SHA-512 as {UPSTREAM_USER} over TLS; 3000 records from an idempotent producer over 15 s with 10 s broker sessions, all consumed in order; {first} authentications at start, {renewed} more while running; produces that waited for those in flight on a retired connection: {waited}; a wrong password leaves the instance unready"
    );
}
