//! The topology refresher: keeps `topology::TopologyHandle` current from any reachable broker,
//! periodically and whenever a request path saw a stale leader.

use std::sync::Arc;
use std::time::Duration;

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
        if topo.api_versions.is_empty() {
            let req = ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str("shardgate"))
                .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
            match pool
                .call::<_, ApiVersionsResponse>(broker, 0, ApiKey::ApiVersions, 3, None, &req)
                .await
            {
                Ok(resp) if resp.error_code == 0 => pool.topology.set_api_versions(&resp),
                Ok(resp) => {
                    last_err =
                        UpstreamError::Protocol(format!("ApiVersions error {}", resp.error_code));
                    continue;
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

/// Background task: refreshes on request (coalescing bursts) and periodically.
pub async fn run_refresher(pool: Arc<Pool>, every: Duration) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match refresh_once(&pool).await {
            Ok(()) => {
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
