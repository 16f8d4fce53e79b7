//! Which upstream socket a request goes on. A broker reads one request per socket at a time,
//! so a request it may hold (a rebalance, an acks=all produce waiting for followers, an admin
//! call with a timeout) would delay every other client's request queued behind it, and a body
//! it cannot parse makes it close the socket under everyone. Such requests go on a connection
//! only their own client waits on (as each Kafka client has its own connections); what the
//! broker answers at once shares the pooled connections.

use std::time::Duration;

use kafka_protocol::messages::*;

use super::connection::ClientConn;
use crate::protocol::RequestFrame;
use crate::upstream::pool::Socket;

/// Added to a request's own timeout: the broker answers a held request at its timeout.
const MARGIN: Duration = Duration::from_secs(15);
/// How long an admin call on the client's own socket may take (their timeouts are the
/// client's; CreateTopics and friends default to 30-60 s).
const ADMIN_WAIT: Duration = Duration::from_secs(120);

/// How long the coordinator may hold a request before answering, for requests that wait for
/// a rebalance: JoinGroup (up to its rebalance timeout) and SyncGroup (until the leader's
/// assignment arrives, bounded by the same timeout).
pub(super) fn parked_for(req: &RequestFrame) -> Option<Duration> {
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
            Some(Duration::from_millis(rebalance_ms) + MARGIN)
        }
        ApiKey::SyncGroup => Some(Duration::from_secs(300) + MARGIN),
        _ => None,
    }
}

/// Whether a produce goes on the client's own socket: acks=all waits for the in-sync followers
/// (up to its timeout), and a throttled client's socket is muted by the broker; acks=0 and
/// acks=1 of an unthrottled client are answered at once and share.
pub(super) fn produce_on_own(
    ctx: &super::Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    acks: i16,
) -> bool {
    acks == -1 || muted_if_shared(ctx, client, req)
}

/// Whether the broker may mute this client's socket: its client id has a quota, or upstream
/// throttled it recently.
fn muted_if_shared(ctx: &super::Ctx, client: &ClientConn, req: &RequestFrame) -> bool {
    client.throttled() || ctx.quotas.applies(req.header.client_id.as_deref())
}

/// The socket of a produce (`own`: see `produce_on_own`) and how long to wait for its answer.
pub(super) fn for_produce(
    client: &ClientConn,
    own: bool,
    timeout_ms: i32,
) -> (Socket, Option<Duration>) {
    if own {
        let own = Duration::from_millis(timeout_ms.max(0) as u64) + MARGIN;
        (Socket::Own(client.id), Some(own))
    } else {
        (Socket::Shared(client.pin()), None)
    }
}

/// Admin APIs forwarded to any broker (the controller may hold them up to their timeout) and
/// DeleteRecords (held until followers have the new log start): the client's own socket.
pub(super) fn for_admin(client: &ClientConn) -> (Socket, Option<Duration>) {
    (Socket::Own(client.id), Some(ADMIN_WAIT))
}
