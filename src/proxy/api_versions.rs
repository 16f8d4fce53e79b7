//! ApiVersions, answered by shardgate: our table ∩ the protocol crate ∩ upstream.

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};

use super::{Ctx, HandlerError, Reply};
use crate::protocol::versions::{Route, SUPPORTED, local_range};
use crate::protocol::{ProtocolError, RequestFrame, codes, encode_response};
use crate::upstream::topology::Topology;

pub fn handle(ctx: &Ctx, req: &RequestFrame) -> Result<Reply, HandlerError> {
    // The body carries only the client's software name; a body we cannot read is not worth
    // refusing the handshake for.
    let _ = req.decode_body::<ApiVersionsRequest>();
    let topo = ctx.topology().load();
    let mut resp = ApiVersionsResponse::default().with_api_keys(ranges(Some(&topo)));
    if req.api_version >= 3
        && let Some(up) = &topo.api_versions_response
    {
        // Feature levels (e.g. transaction.version) steer client behaviour: pass them through.
        resp.supported_features = up.supported_features.clone();
        resp.finalized_features = up.finalized_features.clone();
        resp.finalized_features_epoch = up.finalized_features_epoch;
    }
    Ok(Reply::Frame(encode_response(
        ApiKey::ApiVersions,
        req.api_version,
        req.correlation_id(),
        &resp,
    )?))
}

/// The KIP-511 answer to an ApiVersions request of a version we do not know: a v0 body with
/// UNSUPPORTED_VERSION and our ranges, so the client can retry with a version we speak.
pub fn downgrade_answer(correlation_id: i32) -> Result<Bytes, ProtocolError> {
    let resp = ApiVersionsResponse::default()
        .with_error_code(codes::UNSUPPORTED_VERSION)
        .with_api_keys(ranges(None));
    encode_response(ApiKey::ApiVersions, 0, correlation_id, &resp)
}

pub fn ranges(upstream: Option<&Topology>) -> Vec<ApiVersion> {
    let mut out = Vec::new();
    for s in SUPPORTED {
        let mut r = local_range(s);
        if let Some(t) = upstream
            && !t.api_versions.is_empty()
            && !matches!(s.route, Route::Local | Route::Sasl)
        {
            match t.api_versions.get(&(s.api as i16)) {
                Some(u) => r = r.intersect(u),
                None => continue,
            }
        }
        if r.is_empty() {
            continue;
        }
        out.push(
            ApiVersion::default()
                .with_api_key(s.api as i16)
                .with_min_version(r.min)
                .with_max_version(r.max),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::{Decodable, VersionRange};

    #[test]
    fn ranges_are_intersected_with_upstream_and_skip_what_upstream_lacks() {
        let mut t = Topology::default();
        t.api_versions
            .insert(ApiKey::Produce as i16, VersionRange { min: 0, max: 11 });
        t.api_versions
            .insert(ApiKey::Fetch as i16, VersionRange { min: 0, max: 17 });
        let r = ranges(Some(&t));
        let produce = r.iter().find(|a| a.api_key == 0).unwrap();
        assert_eq!((produce.min_version, produce.max_version), (3, 11));
        let fetch = r.iter().find(|a| a.api_key == 1).unwrap();
        assert_eq!((fetch.min_version, fetch.max_version), (4, 17));
        // What shardgate answers itself (ApiVersions, the SASL exchange) is offered whatever
        // upstream has.
        let local = [
            ApiKey::ApiVersions as i16,
            ApiKey::SaslHandshake as i16,
            ApiKey::SaslAuthenticate as i16,
        ];
        assert!(
            r.iter()
                .all(|a| [0, 1].contains(&a.api_key) || local.contains(&a.api_key))
        );
    }

    #[test]
    fn downgrade_answer_is_a_v0_body_with_unsupported_version() {
        let f = downgrade_answer(9).unwrap();
        let mut body = f.slice(8..); // length + correlation id (header v0)
        assert_eq!(&f[4..8], &9i32.to_be_bytes());
        let resp = ApiVersionsResponse::decode(&mut body, 0).unwrap();
        assert_eq!(resp.error_code, codes::UNSUPPORTED_VERSION);
        assert!(
            resp.api_keys
                .iter()
                .any(|k| k.api_key == ApiKey::Produce as i16)
        );
    }
}
