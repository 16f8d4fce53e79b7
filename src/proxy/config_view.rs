//! A real broker's DescribeConfigs answer turned into a virtual broker's: nothing in it may name
//! a real broker, controller, rack, listener or data directory.
//!
//! Per key (synonyms included):
//! - rewritten to the virtual view: `broker.id` and `node.id` (the virtual id), `listeners` and
//!   `advertised.listeners` (the virtual node's address), `listener.security.protocol.map`
//!   (that one listener);
//! - dropped: the controller quorum (`controller.quorum.voters`,
//!   `controller.quorum.bootstrap.servers`, `controller.listener.names`), the real node's
//!   roles and inter-broker listener (`process.roles`, `inter.broker.listener.name`,
//!   `security.inter.broker.protocol`, `early.start.listeners`, `listener.name.*`), its rack
//!   (`broker.rack`: a virtual broker has none, and a real one's rack tells where it runs), its
//!   directories (`log.dirs`, `log.dir`, `metadata.log.dir`), its key and trust store files
//!   (`ssl.keystore.location`, `ssl.truststore.location`) and legacy address keys. Dropping is
//!   chosen over a made-up value because a virtual broker has no such thing;
//! - dropped as well: any other entry or synonym whose value contains a real broker's
//!   `host:port` (the topology's addresses and every address the answer's own listener and
//!   voter settings name), so a key this list does not know still cannot leak one.

use kafka_protocol::messages::describe_configs_response::DescribeConfigsResult;
use kafka_protocol::protocol::StrBytes;

/// Keys whose value is the virtual broker's id.
const ID_KEYS: &[&str] = &["broker.id", "node.id"];
/// Keys whose value is the virtual node's listener.
const LISTENER_KEYS: &[&str] = &["listeners", "advertised.listeners"];
const PROTOCOL_MAP: &str = "listener.security.protocol.map";
/// Keys that describe only the real node: dropped.
const DROPPED: &[&str] = &[
    "controller.quorum.voters",
    "controller.quorum.bootstrap.servers",
    "controller.listener.names",
    "process.roles",
    "inter.broker.listener.name",
    "security.inter.broker.protocol",
    "early.start.listeners",
    "control.plane.listener.name",
    "broker.rack",
    "log.dirs",
    "log.dir",
    "metadata.log.dir",
    // Files on the real node (the store paths tell how it is set up; the stores are its own).
    "ssl.keystore.location",
    "ssl.truststore.location",
    "host.name",
    "port",
    "advertised.host.name",
    "advertised.port",
    "zookeeper.connect",
    // Replication throttles shardgate sets on a real broker while it moves replicas: that
    // broker's, not the virtual node's.
    "leader.replication.throttled.rate",
    "follower.replication.throttled.rate",
];
/// Per-listener settings of the real listeners.
const DROPPED_PREFIX: &str = "listener.name.";
/// Keys whose values name addresses, read to learn the real addresses to hide.
const ADDRESS_KEYS: &[&str] = &[
    "listeners",
    "advertised.listeners",
    "controller.quorum.voters",
    "controller.quorum.bootstrap.servers",
];

/// The virtual broker a result is rewritten for.
pub struct VirtualNode<'a> {
    pub id: i32,
    /// Listener name and security protocol shown, e.g. "PLAINTEXT" or "SSL".
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: u16,
}

fn dropped(name: &str) -> bool {
    DROPPED.contains(&name) || name.starts_with(DROPPED_PREFIX)
}

/// `host:port` items of a listener list (`NAME://host:port,...`), a voter list
/// (`id@host:port,...`) or a server list; items without a host (bind to all) are skipped.
fn addresses_in(value: &str) -> impl Iterator<Item = String> + '_ {
    value.split(',').filter_map(|item| {
        let item = item.trim();
        let item = item.rsplit_once("://").map_or(item, |(_, a)| a);
        let item = item.split_once('@').map_or(item, |(_, a)| a);
        let (host, port) = item.rsplit_once(':')?;
        (!host.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
            .then(|| item.to_string())
    })
}

/// `value` names `addr` as a whole address (so "h:1909" does not match "h:19092").
fn names_address(value: &str, addr: &str) -> bool {
    value.match_indices(addr).any(|(i, _)| {
        let before = value[..i].chars().next_back();
        let after = value[i + addr.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

/// Rewrites `result` (one real broker's configuration) into `node`'s view. `real` are the
/// real brokers' `host:port` addresses known from the topology.
pub fn rewrite(result: &mut DescribeConfigsResult, node: &VirtualNode<'_>, real: &[String]) {
    let mut hidden: Vec<String> = real.to_vec();
    for c in &result.configs {
        let values = std::iter::once((c.name.as_str(), c.value.as_deref())).chain(
            c.synonyms
                .iter()
                .map(|s| (s.name.as_str(), s.value.as_deref())),
        );
        for (name, value) in values {
            if ADDRESS_KEYS.contains(&name) {
                hidden.extend(addresses_in(value.unwrap_or("")));
            }
        }
    }
    let leaks = |v: Option<&str>| v.is_some_and(|v| hidden.iter().any(|a| names_address(v, a)));
    let id = StrBytes::from_string(node.id.to_string());
    let listener = StrBytes::from_string(format!("{}://{}:{}", node.scheme, node.host, node.port));
    let protocols = StrBytes::from_string(format!("{0}:{0}", node.scheme));
    result.configs.retain_mut(|c| {
        let shown = match c.name.as_str() {
            n if ID_KEYS.contains(&n) => Some(id.clone()),
            n if LISTENER_KEYS.contains(&n) => Some(listener.clone()),
            PROTOCOL_MAP => Some(protocols.clone()),
            n if dropped(n) => return false,
            _ => None,
        };
        match shown {
            Some(v) => {
                // The synonyms are the real node's values of the same setting.
                c.value = Some(v);
                c.synonyms.clear();
                true
            }
            None if leaks(c.value.as_deref()) => false,
            None => {
                c.synonyms
                    .retain(|s| !dropped(&s.name) && !leaks(s.value.as_deref()));
                true
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::describe_configs_response::{
        DescribeConfigsResourceResult, DescribeConfigsSynonym,
    };

    fn entry(name: &str, value: &str) -> DescribeConfigsResourceResult {
        DescribeConfigsResourceResult::default()
            .with_name(StrBytes::from_string(name.into()))
            .with_value(Some(StrBytes::from_string(value.into())))
            .with_synonyms(vec![
                DescribeConfigsSynonym::default()
                    .with_name(StrBytes::from_string(name.into()))
                    .with_value(Some(StrBytes::from_string(value.into()))),
            ])
    }

    /// Node 1 of the testbed, as Kafka describes it.
    fn testbed_node() -> DescribeConfigsResult {
        DescribeConfigsResult::default().with_configs(vec![
            entry("node.id", "1"),
            entry("broker.id", "1"),
            entry("process.roles", "broker,controller"),
            entry(
                "controller.quorum.voters",
                "1@127.0.0.1:19192,2@127.0.0.1:19193,3@127.0.0.1:19194",
            ),
            entry("controller.listener.names", "CONTROLLER"),
            entry(
                "listeners",
                "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19192,SSL://127.0.0.1:19392",
            ),
            entry(
                "advertised.listeners",
                "PLAINTEXT://127.0.0.1:19092,SSL://127.0.0.1:19392",
            ),
            entry(
                "listener.security.protocol.map",
                "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL",
            ),
            entry("inter.broker.listener.name", "PLAINTEXT"),
            entry("broker.rack", "rack-a"),
            entry("log.dirs", "/run/kafka-1/data"),
            entry("metadata.log.dir", "/run/kafka-1/meta"),
            entry("listener.name.ssl.ssl.keystore.location", "/run/tls/k.pem"),
            entry("ssl.keystore.location", "/run/tls/broker.pem"),
            entry("ssl.truststore.location", "/run/tls/ca.pem"),
            // Not on the list, but naming a real address: caught by value.
            entry("some.plugin.endpoint", "http://127.0.0.1:19193/x"),
            entry("num.partitions", "1"),
            entry("ssl.endpoint.identification.algorithm", "https"),
        ])
    }

    fn names(r: &DescribeConfigsResult) -> Vec<&str> {
        r.configs.iter().map(|c| c.name.as_str()).collect()
    }

    fn value<'a>(r: &'a DescribeConfigsResult, name: &str) -> &'a str {
        r.configs
            .iter()
            .find(|c| c.name.as_str() == name)
            .and_then(|c| c.value.as_deref())
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    #[test]
    fn a_real_node_becomes_the_virtual_node() {
        let mut r = testbed_node();
        let node = VirtualNode {
            id: 0,
            scheme: "PLAINTEXT",
            host: "127.0.0.1",
            port: 29092,
        };
        // The topology knows the client listeners; node 2's controller (in the plugin value)
        // is known from the voters.
        let real = ["127.0.0.1:19092", "127.0.0.1:19093", "127.0.0.1:19094"].map(String::from);
        rewrite(&mut r, &node, &real);
        assert_eq!(
            names(&r),
            [
                "node.id",
                "broker.id",
                "listeners",
                "advertised.listeners",
                "listener.security.protocol.map",
                "num.partitions",
                "ssl.endpoint.identification.algorithm"
            ]
        );
        assert_eq!(value(&r, "node.id"), "0");
        assert_eq!(value(&r, "broker.id"), "0");
        assert_eq!(value(&r, "listeners"), "PLAINTEXT://127.0.0.1:29092");
        assert_eq!(
            value(&r, "listener.security.protocol.map"),
            "PLAINTEXT:PLAINTEXT"
        );
        assert_eq!(value(&r, "num.partitions"), "1");
        let everything: String = r
            .configs
            .iter()
            .flat_map(|c| {
                std::iter::once(c.value.as_deref().unwrap_or(""))
                    .chain(c.synonyms.iter().map(|s| s.value.as_deref().unwrap_or("")))
            })
            .collect::<Vec<_>>()
            .join(" ");
        for port in [
            "1909",
            "1919",
            "1939",
            "kafka-1",
            "rack-a",
            "CONTROLLER",
            "/run/tls",
        ] {
            assert!(!everything.contains(port), "{port} in {everything}");
        }
    }

    #[test]
    fn addresses_are_matched_whole() {
        assert!(names_address("PLAINTEXT://h:9092", "h:9092"));
        assert!(names_address("1@h:9092,2@g:1", "h:9092"));
        assert!(!names_address("h:90921", "h:9092"), "a longer port");
        assert!(!names_address("ah:9092", "h:9092"), "a longer host");
        assert!(!names_address("10.0.0.1:9092", "0.0.0.1:9092"));
        let found: Vec<String> =
            addresses_in("PLAINTEXT://:9092,CONTROLLER://c:9093,1@v:9094,s:9095").collect();
        assert_eq!(found, ["c:9093", "v:9094", "s:9095"]);
    }
}
