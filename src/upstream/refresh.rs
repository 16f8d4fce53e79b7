//! The topology refresher: keeps `topology::TopologyHandle` current from any reachable broker,
//! periodically and whenever a request path saw a stale leader, and asks every broker for its
//! ApiVersions (`BrokerAsks`): clients are offered what all of them support.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::UpstreamError;
use super::pool::{Pool, bootstrap_id};
use super::topology::Topology;

/// The Metadata version shardgate uses for its own refreshes.
fn metadata_version(t: &Topology) -> i16 {
    t.api_versions
        .get(&(ApiKey::Metadata as i16))
        .map(|r| r.max.min(12))
        .unwrap_or(9)
}

/// Refreshes the whole topology from some reachable broker: known brokers first, then the
/// bootstrap list, so a cluster whose brokers all changed address is still found.
pub async fn refresh_once(pool: &Pool) -> Result<(), UpstreamError> {
    let topo = pool.topology.load();
    let mut candidates: Vec<i32> = topo.brokers.keys().copied().collect();
    candidates.extend((0..pool.bootstrap_len()).map(bootstrap_id));
    let mut last_err = UpstreamError::NoBroker;
    for broker in candidates {
        // Nothing known yet: the first reachable broker's answer serves until every broker's
        // own answer is in (`ask_brokers`).
        if pool.topology.load().api_versions.is_empty() {
            match api_versions(pool, broker).await {
                Ok(resp) => {
                    let id = topo.brokers.contains_key(&broker).then_some(broker);
                    pool.topology.set_api_versions(id, &resp);
                }
                Err(e) => {
                    last_err = e;
                    continue;
                }
            }
        }
        let version = metadata_version(&pool.topology.load());
        let req = MetadataRequest::default()
            .with_topics(None)
            .with_allow_auto_topic_creation(false);
        match pool
            .call::<_, MetadataResponse>(broker, 0, ApiKey::Metadata, version, None, &req)
            .await
        {
            Ok(resp) => {
                pool.topology.absorb(&resp, true);
                return Ok(());
            }
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

async fn api_versions(pool: &Pool, broker: i32) -> Result<ApiVersionsResponse, UpstreamError> {
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("shardgate"))
        .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
    let resp = pool
        .call::<_, ApiVersionsResponse>(broker, 0, ApiKey::ApiVersions, 3, None, &req)
        .await?;
    if resp.error_code != 0 {
        return Err(UpstreamError::Protocol(format!(
            "ApiVersions error {}",
            resp.error_code
        )));
    }
    Ok(resp)
}

/// When each broker was last asked for its ApiVersions.
#[derive(Debug, Clone, Copy)]
enum Ask {
    Pending,
    Answered(Instant),
}

/// Asks every broker of the snapshot for its ApiVersions: a broker not asked yet (new, or back
/// after it left the snapshot) at once, the others again once `every` has passed (a broker
/// restarted with another version in between is noticed then). Asks run in their own tasks so
/// a stalled broker never holds up the refresh; a failed ask is repeated at the next refresh.
#[derive(Default)]
pub struct BrokerAsks {
    state: Mutex<HashMap<i32, Ask>>,
}

impl BrokerAsks {
    /// Brokers to ask now (marked pending); forgets brokers that left the snapshot.
    fn due(&self, brokers: &[i32], every: Duration) -> Vec<i32> {
        let mut state = self.state.lock().expect("asks lock");
        state.retain(|id, _| brokers.contains(id));
        let mut out = Vec::new();
        for id in brokers {
            let due = match state.get(id) {
                None => true,
                Some(Ask::Pending) => false,
                Some(Ask::Answered(at)) => at.elapsed() >= every,
            };
            if due {
                state.insert(*id, Ask::Pending);
                out.push(*id);
            }
        }
        out
    }

    fn done(&self, broker: i32, answered: bool) {
        let mut state = self.state.lock().expect("asks lock");
        if answered {
            state.insert(broker, Ask::Answered(Instant::now()));
        } else {
            state.remove(&broker);
        }
    }
}

/// Starts the ApiVersions asks that are due (see `BrokerAsks`).
pub fn ask_brokers(pool: &Arc<Pool>, asks: &Arc<BrokerAsks>, every: Duration) {
    let brokers: Vec<i32> = pool.topology.load().brokers.keys().copied().collect();
    for broker in asks.due(&brokers, every) {
        let (pool, asks) = (pool.clone(), asks.clone());
        tokio::spawn(async move {
            match api_versions(&pool, broker).await {
                Ok(resp) => {
                    pool.topology.set_api_versions(Some(broker), &resp);
                    asks.done(broker, true);
                }
                Err(e) => {
                    tracing::debug!(broker, error = %e, "ApiVersions ask failed; asked again at the next refresh");
                    asks.done(broker, false);
                }
            }
        });
    }
}

/// Background task: refreshes on request (coalescing bursts) and periodically.
pub async fn run_refresher(pool: Arc<Pool>, every: Duration) {
    let mut backoff = Duration::from_millis(100);
    let asks = Arc::new(BrokerAsks::default());
    loop {
        match refresh_once(&pool).await {
            Ok(()) => {
                ask_brokers(&pool, &asks, every);
                backoff = Duration::from_millis(100);
                metrics::counter!("shardgate_topology_refreshes_total", "result" => "ok")
                    .increment(1);
                tokio::select! {
                    _ = pool.topology.refresh_requested() => {}
                    _ = tokio::time::sleep(every) => {}
                }
            }
            Err(e) => {
                metrics::counter!("shardgate_topology_refreshes_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "topology refresh failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_broker_is_asked_new_ones_at_once_others_again_after_the_interval() {
        let asks = BrokerAsks::default();
        let every = Duration::from_millis(300);
        assert_eq!(asks.due(&[1, 2, 3], every), [1, 2, 3]);
        assert!(
            asks.due(&[1, 2, 3], every).is_empty(),
            "pending asks are not repeated"
        );
        asks.done(1, true);
        asks.done(2, false);
        assert_eq!(
            asks.due(&[1, 2, 3], every),
            [2],
            "a failed ask is repeated at the next refresh, an answered one not yet"
        );
        asks.done(2, true);
        asks.done(3, true);
        // Broker 3 leaves the snapshot and comes back: asked again at once.
        assert!(asks.due(&[1, 2], every).is_empty());
        assert_eq!(asks.due(&[1, 2, 3], every), [3]);
        std::thread::sleep(every);
        assert_eq!(
            asks.due(&[1, 2, 3], every),
            [1, 2],
            "answered brokers are asked again after the interval (3 is still pending)"
        );
    }
}
