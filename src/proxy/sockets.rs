//! Which requests a broker may hold (a rebalance, a long wait) and so must not share an upstream
//! socket with other clients' requests: they get a connection of their own.

use kafka_protocol::messages::*;

use crate::protocol::RequestFrame;

/// How long the coordinator may hold a request before answering, for requests that wait for
/// a rebalance: JoinGroup (up to its rebalance timeout) and SyncGroup (until the leader's
/// assignment arrives, bounded by the same timeout).
pub(super) fn parked_for(req: &RequestFrame) -> Option<std::time::Duration> {
    let margin = std::time::Duration::from_secs(15);
    match req.api_key {
        ApiKey::JoinGroup => {
            let rebalance_ms = req
                .decode_body::<JoinGroupRequest>()
                .map(|b| {
                    if b.rebalance_timeout_ms > 0 {
                        b.rebalance_timeout_ms
                    } else {
                        b.session_timeout_ms
                    }
                })
                .unwrap_or(300_000)
                .max(0) as u64;
            Some(std::time::Duration::from_millis(rebalance_ms) + margin)
        }
        ApiKey::SyncGroup => Some(std::time::Duration::from_secs(300) + margin),
        _ => None,
    }
}
