//! shardgate's own OAUTHBEARER login to Kafka (issue 13): tokens from a real OAuth server (the
//! testbed's Ory Hydra, `up --oauth`, as `integration/run-tests` does) checked by Kafka's own
//! JWT validator on the brokers' OAUTH listeners (19892..). See integration/hydra.sh.
//! Ports: instances 127.0.0.1:29151..29153, admin 29251..29253.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// integration/hydra.sh: HYDRA_TOKEN_URL, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET.
const TOKEN_URL: &str = "http://127.0.0.1:28444/oauth2/token";
const CLIENT_ID: &str = "shardgate-upstream";
const CLIENT_SECRET: &str = "shardgate-oauth-client-secret";
/// OAUTH_AUDIENCE: the brokers expect it in `aud`.
const AUDIENCE: &str = "kafka";

/// An instance whose upstream is the brokers' OAUTH listeners, with `sasl` as the rest of its
/// `[upstream.sasl]` section (after `mechanism = "OAUTHBEARER"`).
fn oauth_instance(n: u16, dir: &std::path::Path, sasl: &str) -> (Shardgate, String, String) {
    upstream_login_instance(
        dir,
        &format!("oauth-{n}"),
        (29150 + n, 29250 + n),
        19891,
        &format!("mechanism = \"OAUTHBEARER\"\n{sasl}"),
    )
}

fn ready(admin: &str) -> bool {
    shardgate::admin::http_request(admin, "GET", "/readyz", None).is_ok_and(|(c, _)| c == 200)
}

/// A token from Hydra, asked directly (client-credentials, HTTP Basic).
fn token_from_hydra() -> String {
    use base64::Engine;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let auth = format!("Basic {basic}");
    let (code, body) = shardgate::http::send(
        &shardgate::http::Request {
            method: "POST",
            url: TOKEN_URL,
            headers: &[("Authorization", &auth)],
            body: Some((
                "application/x-www-form-urlencoded",
                format!("grant_type=client_credentials&audience={AUDIENCE}").as_bytes(),
            )),
            timeout: Duration::from_secs(10),
        },
        None,
    )
    .unwrap();
    assert_eq!(code, 200, "hydra token endpoint: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

/// shardgate logs in to Kafka with OAUTHBEARER: (1) tokens from Hydra's token endpoint
/// (client-credentials), each lasting 30 s, while the brokers end sessions after 10 s: an
/// idempotent producer and a consumer running through it for 36 s lose nothing and see every
/// partition in order, shardgate fetched a new token before the first expired, and no login
/// failed; (2) a token read from a file works, and when the file holds a token whose signature
/// does not verify, the broker's refusal is counted and logged as such; (3) a wrong client
/// secret leaves the instance unready, the endpoint's error logged, the secret never.
#[test]
#[ignore = "needs the testbed with Hydra: integration/run-tests"]
fn shardgate_logs_in_to_kafka_with_oauth_tokens_from_an_endpoint_or_a_file() {
    let dir = cache().join("run").join("oauth-test");
    std::fs::create_dir_all(&dir).unwrap();
    let auths = |admin: &str, result: &str| {
        metric_of(
            admin,
            "shardgate_upstream_sasl_authentications_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    let tokens = |admin: &str, result: &str| {
        metric_of(
            admin,
            "shardgate_upstream_oauth_tokens_total",
            &[&format!("result=\"{result}\"")],
        )
    };

    // (1) The token endpoint.
    // SAFETY: set before the instance is spawned; no other thread reads it.
    unsafe { std::env::set_var("SHARDGATE_TEST_OAUTH_SECRET", CLIENT_SECRET) };
    let (_a, a, a_admin) = oauth_instance(
        1,
        &dir,
        &format!(
            "token_endpoint = \"{TOKEN_URL}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_env = \"SHARDGATE_TEST_OAUTH_SECRET\"\naudience = \"{AUDIENCE}\""
        ),
    );
    eventually("the OAuth instance ready", Duration::from_secs(60), || {
        ready(&a_admin)
    });
    let first_tokens = tokens(&a_admin, "ok");
    assert!(first_tokens >= 1.0, "no token fetched");
    let topic = unique("oauth");
    create_topic_direct(&topic, &["--partitions", "2", "--replication-factor", "1"]);
    produce_and_consume_in_order(&a, &topic, 3600, 100);
    let fetched = tokens(&a_admin, "ok");
    assert!(
        fetched >= first_tokens + 1.0,
        "no new token within 36 s of 30 s tokens ({fetched} fetched)"
    );
    let logins = auths(&a_admin, "ok");
    assert!(
        logins >= 3.0,
        "only {logins} logins in 36 s of 10 s sessions"
    );
    assert_eq!(auths(&a_admin, "failed"), 0.0, "an OAuth login failed");
    assert_eq!(tokens(&a_admin, "failed"), 0.0, "a token request failed");

    // (2) A token file; then a token whose signature does not verify.
    let file = dir.join("token.jwt");
    std::fs::write(&file, format!("{}\n", token_from_hydra())).unwrap();
    let (_b, b, b_admin) = oauth_instance(2, &dir, &format!("token_file = \"{}\"", file.display()));
    eventually(
        "the token-file instance ready",
        Duration::from_secs(60),
        || ready(&b_admin),
    );
    let topic_b = unique("oauth-file");
    create_topic_direct(
        &topic_b,
        &["--partitions", "1", "--replication-factor", "1"],
    );
    produce_and_consume_in_order(&b, &topic_b, 200, 1000);
    let good = token_from_hydra();
    let (head, sig) = good.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    std::fs::write(&file, format!("{head}.{flipped}{}", &sig[1..])).unwrap();
    // Connections are replaced within 8 s of their 10 s sessions (metadata is refreshed every
    // second, so the instance keeps using them): the next login presents the forged token.
    eventually("a refused token counted", Duration::from_secs(40), || {
        auths(&b_admin, "failed") >= 1.0
    });
    let log = std::fs::read_to_string(dir.join("oauth-2.log")).unwrap();
    assert!(log.contains("token refused"), "the log names the refusal");
    assert!(!log.contains(&good[..40]), "a token in the log");

    // (3) A wrong client secret.
    let (_c, _, c_admin) = oauth_instance(
        3,
        &dir,
        &format!(
            "token_endpoint = \"{TOKEN_URL}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"not-the-secret\"\naudience = \"{AUDIENCE}\""
        ),
    );
    eventually(
        "the failed token request counted",
        Duration::from_secs(30),
        || tokens(&c_admin, "failed") >= 1.0,
    );
    assert!(!ready(&c_admin), "ready with a wrong client secret");
    let log = std::fs::read_to_string(dir.join("oauth-3.log")).unwrap();
    assert!(
        log.contains("answered 401") && !log.contains("not-the-secret"),
        "the log names the endpoint's answer, never the secret"
    );
    println!(
        "upstream OAUTHBEARER: 3600 records over 36 s through Hydra-issued 30 s tokens and 10 s broker sessions, all consumed in order; tokens fetched {fetched}, logins {logins}, none failed; a token file works and a forged signature is refused and counted; a wrong client secret leaves the instance unready"
    );
}
