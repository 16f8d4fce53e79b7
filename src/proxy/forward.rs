//! Helpers every request path shares: which broker takes a request any broker can serve, and
//! typed calls and replies at the client's API version.

use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

use super::connection::ClientConn;
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{RequestFrame, encode_response};
use crate::upstream::UpstreamError;

pub(super) fn any_broker(ctx: &Ctx, client: &ClientConn) -> Result<i32, UpstreamError> {
    let topo = ctx.topology().load();
    if topo.brokers.contains_key(&topo.controller_id) && client.id.is_multiple_of(2) {
        return Ok(topo.controller_id);
    }
    topo.any_broker(client.id).ok_or(UpstreamError::NoBroker)
}

pub(super) fn typed_reply<T: Encodable>(
    req: &RequestFrame,
    resp: &T,
) -> Result<Reply, HandlerError> {
    Ok(Reply::Frame(encode_response(
        req.api_key,
        req.api_version,
        req.correlation_id(),
        resp,
    )?))
}

/// Forwards a typed request at the client's version and decodes the typed response.
pub(super) async fn call_typed<Req, Resp>(
    ctx: &Ctx,
    client: &ClientConn,
    broker: i32,
    req: &RequestFrame,
    body: &Req,
) -> Result<Resp, HandlerError>
where
    Req: Encodable + HeaderVersion,
    Resp: Decodable,
{
    Ok(ctx
        .pool
        .call(
            broker,
            client.pin(),
            req.api_key,
            req.api_version,
            req.header.client_id.clone(),
            body,
        )
        .await?)
}
