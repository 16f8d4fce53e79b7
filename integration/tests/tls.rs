//! TLS on the client listener: a shardgate instance with a certificate serves confluent-kafka
//! and kafka-python through TLS, and a plaintext client is refused and counted.
//! Ports: 127.0.0.1:29093 (TLS clients), 127.0.0.1:29101 (admin).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const ADMIN: &str = "http://127.0.0.1:29101";

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn tls_clients_round_trip_and_plaintext_is_refused() {
    let dir = cache().join("run").join("tls-test");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(60),
    );
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let config = format!(
        "[listener]\nbind = \"127.0.0.1:29093\"\n[listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n[upstream]\nbootstrap = [{}]\n[admin]\nbind = \"127.0.0.1:29101\"\n[store]\npath = \"{}\"\n",
        cert.display(),
        key.display(),
        bootstrap.join(", "),
        dir.join("data").display()
    );
    let _sg = start_shardgate(&dir, "tls", &config, ADMIN);

    // confluent-kafka (its wheel bundles librdkafka with OpenSSL; Debian's kcat has no TLS)
    // and kafka-python (Python's ssl module), both over TLS.
    let script = repo().join("integration/clients/py/kclient.py");
    let ca = cert.to_str().unwrap();
    for lib in ["confluent", "kafka-python"] {
        let topic = unique(&format!("tls-{lib}"));
        let py = |args: &[&str]| -> serde_json::Value {
            let out = run_ok(
                Command::new(python())
                    .arg(&script)
                    .args(["--lib", lib, "--ca", ca])
                    .args(args),
                Duration::from_secs(120),
            );
            serde_json::from_str(out.trim()).unwrap()
        };
        let r = py(&[
            "produce",
            "--brokers",
            "127.0.0.1:29093",
            "--topic",
            &topic,
            "--count",
            "100",
        ]);
        assert_eq!(r["acked"], 100, "{lib}: {r}");
        let r = py(&[
            "consume",
            "--brokers",
            "127.0.0.1:29093",
            "--topic",
            &topic,
            "--group",
            &unique("g-tls"),
            "--count",
            "100",
        ]);
        assert_eq!(r["consumed"], 100, "{lib}: {r}");
    }

    // A plaintext client on the TLS port gets no Kafka answer, and the handshake failure is
    // counted.
    let before = shardgate::admin::http_request(ADMIN, "GET", "/metrics", None)
        .unwrap()
        .1;
    let plain = run(
        Command::new("kcat").args(["-L", "-b", "127.0.0.1:29093", "-m", "3"]),
        Duration::from_secs(30),
    );
    assert!(
        !plain.status.success(),
        "plaintext metadata request succeeded on the TLS port"
    );
    let after = shardgate::admin::http_request(ADMIN, "GET", "/metrics", None)
        .unwrap()
        .1;
    let count = |m: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("shardgate_frame_errors_total{kind=\"tls_handshake\"}"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        count(&after) > count(&before),
        "TLS handshake failure not counted"
    );
}

/// TLS towards Kafka: a shardgate instance whose upstream is the brokers' SSL listeners
/// (127.0.0.1:1939n, certificate written by the testbed) serves plaintext clients.
/// Ports: 127.0.0.1:29094 (clients), 127.0.0.1:29102 (admin).
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn upstream_tls_to_the_brokers_ssl_listeners() {
    let dir = cache().join("run").join("tls-upstream-test");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = cache().join("run/tls/ca.pem");
    assert!(ca.is_file(), "the testbed did not write {}", ca.display());
    let ssl: Vec<String> = (1..=brokers())
        .map(|n| format!("\"127.0.0.1:{}\"", 19391 + n))
        .collect();
    let config = format!(
        "[listener]\nbind = \"127.0.0.1:29094\"\n[upstream]\nbootstrap = [{}]\n[upstream.tls]\nca = \"{}\"\n[admin]\nbind = \"127.0.0.1:29102\"\n[store]\npath = \"{}\"\n",
        ssl.join(", "),
        ca.display(),
        dir.join("data").display()
    );
    let _sg = start_shardgate(&dir, "upstream-tls", &config, "http://127.0.0.1:29102");
    let topic = unique("tls-up");
    let input = dir.join("in.txt");
    std::fs::write(
        &input,
        (0..100).map(|i| format!("k{i}:v{i}\n")).collect::<String>(),
    )
    .unwrap();
    run_ok(
        Command::new("kcat")
            .args([
                "-P",
                "-b",
                "127.0.0.1:29094",
                "-t",
                &topic,
                "-K",
                ":",
                "-X",
                "acks=all",
                "-l",
            ])
            .arg(&input),
        Duration::from_secs(60),
    );
    let out = run_ok(
        Command::new("kcat").args([
            "-C",
            "-b",
            "127.0.0.1:29094",
            "-t",
            &topic,
            "-e",
            "-q",
            "-f",
            "%s\n",
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(out.lines().count(), 100, "{out}");
}
