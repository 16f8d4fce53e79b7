//! Which client ids have a Kafka quota. Kafka answers a client over its quota at once and
//! then mutes the *socket* the answer went on for the throttle time (KIP-219); on one of
//! shardgate's shared upstream sockets that would stall every other client on it. So the
//! produces and fetches of a client id with a quota (or of every client, if a default
//! client-id quota exists) go on sockets of their own from the start, and a client that is
//! throttled anyway (a quota set since the last read) from then on.
//!
//! Quotas on users apply to shardgate's own principal upstream, shared by all its clients:
//! shardgate cannot split them (README, limits).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kafka_protocol::messages::describe_client_quotas_request::ComponentData;
use kafka_protocol::messages::{ApiKey, DescribeClientQuotasRequest, DescribeClientQuotasResponse};
use kafka_protocol::protocol::StrBytes;

use crate::protocol::codes;
use crate::upstream::pool::Pool;

/// How often the quota configuration is read from Kafka.
pub const REFRESH: Duration = Duration::from_secs(10);

const MATCH_DEFAULT: i8 = 1;
const MATCH_SPECIFIED: i8 = 2;

#[derive(Default)]
pub struct ClientQuotas {
    state: RwLock<Known>,
}

#[derive(Default, Clone, PartialEq, Eq, Debug)]
struct Known {
    /// Client ids with a quota of their own (alone or with a user).
    ids: HashSet<String>,
    /// A default client-id quota exists: every client id has one.
    default: bool,
}

impl ClientQuotas {
    pub fn applies(&self, client_id: Option<&str>) -> bool {
        let k = self.state.read().expect("quotas lock");
        k.default || client_id.is_some_and(|c| k.ids.contains(c))
    }

    fn set(&self, known: Known) {
        let mut k = self.state.write().expect("quotas lock");
        if *k != known {
            tracing::info!(
                client_ids = known.ids.len(),
                default = known.default,
                "client quotas upstream"
            );
            metrics::gauge!("shardgate_quota_client_ids").set(known.ids.len() as f64);
            *k = known;
        }
    }
}

/// Reads the client-id quotas from Kafka every `REFRESH` (any broker answers).
pub async fn run(pool: Arc<Pool>, quotas: Arc<ClientQuotas>) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match read(&pool).await {
            Ok(k) => quotas.set(k),
            Err(e) => {
                metrics::counter!("shardgate_quota_read_errors_total").increment(1);
                tracing::debug!(error = %e, "reading client quotas failed; keeping the last view");
            }
        }
    }
}

async fn read(pool: &Pool) -> Result<Known, String> {
    let broker = pool
        .topology
        .load()
        .any_broker(0)
        .ok_or("no broker known")?;
    let mut known = Known::default();
    for match_type in [MATCH_SPECIFIED, MATCH_DEFAULT] {
        let req = DescribeClientQuotasRequest::default()
            .with_components(vec![
                ComponentData::default()
                    .with_entity_type(StrBytes::from_static_str("client-id"))
                    .with_match_type(match_type)
                    .with_match(None),
            ])
            .with_strict(false);
        let resp: DescribeClientQuotasResponse = pool
            .call(broker, 0, ApiKey::DescribeClientQuotas, 1, None, &req)
            .await
            .map_err(|e| e.to_string())?;
        if resp.error_code != codes::NONE {
            return Err(format!(
                "DescribeClientQuotas error {}: {:?}",
                resp.error_code, resp.error_message
            ));
        }
        for entry in resp.entries.unwrap_or_default() {
            if entry.values.is_empty() {
                continue;
            }
            for e in &entry.entity {
                if e.entity_type.as_str() != "client-id" {
                    continue;
                }
                match &e.entity_name {
                    Some(name) => {
                        known.ids.insert(name.to_string());
                    }
                    None => known.default = true,
                }
            }
        }
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_default_quotas_apply() {
        let q = ClientQuotas::default();
        assert!(!q.applies(Some("a")));
        q.set(Known {
            ids: ["a".to_string()].into(),
            default: false,
        });
        assert!(q.applies(Some("a")));
        assert!(!q.applies(Some("b")));
        assert!(!q.applies(None));
        q.set(Known {
            ids: HashSet::new(),
            default: true,
        });
        assert!(q.applies(Some("b")) && q.applies(None));
    }
}
