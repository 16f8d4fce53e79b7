//! Requests naming several groups whose coordinators differ (admin clients batch them because
//! every group's coordinator looks like the same shardgate node): split, sent, merged.

use std::collections::BTreeMap;

use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::connection::ClientConn;
use super::forward::{call_typed, typed_reply};
use super::{Ctx, HandlerError, Reply};
use crate::protocol::RequestFrame;

/// Multi-group requests whose groups live on different coordinators (admin clients batch them
/// because every group's coordinator looks like the same shardgate node).
pub(super) async fn split_by_coordinator(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    targets: BTreeMap<i32, Vec<String>>,
) -> Result<Reply, HandlerError> {
    let gid = |s: &String| GroupId(StrBytes::from_string(s.clone()));
    match req.api_key {
        ApiKey::DescribeGroups => {
            let body: DescribeGroupsRequest = req.decode_body()?;
            let mut merged = DescribeGroupsResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.groups = groups.iter().map(gid).collect();
                let r: DescribeGroupsResponse = call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.groups.extend(r.groups);
            }
            typed_reply(req, &merged)
        }
        ApiKey::DeleteGroups => {
            let body: DeleteGroupsRequest = req.decode_body()?;
            let mut merged = DeleteGroupsResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.groups_names = groups.iter().map(gid).collect();
                let r: DeleteGroupsResponse = call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.results.extend(r.results);
            }
            typed_reply(req, &merged)
        }
        ApiKey::ConsumerGroupDescribe => {
            let body: ConsumerGroupDescribeRequest = req.decode_body()?;
            let mut merged = ConsumerGroupDescribeResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.group_ids = groups.iter().map(gid).collect();
                let r: ConsumerGroupDescribeResponse =
                    call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.groups.extend(r.groups);
            }
            typed_reply(req, &merged)
        }
        ApiKey::OffsetFetch => {
            let body: OffsetFetchRequest = req.decode_body()?;
            let mut merged = OffsetFetchResponse::default();
            for (broker, groups) in targets {
                let mut sub = body.clone();
                sub.groups
                    .retain(|g| groups.iter().any(|k| g.group_id.as_str() == k.as_str()));
                let r: OffsetFetchResponse = call_typed(ctx, client, broker, req, &sub).await?;
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                merged.groups.extend(r.groups);
            }
            typed_reply(req, &merged)
        }
        other => Err(HandlerError::Protocol(
            crate::protocol::ProtocolError::Decode {
                what: format!("{other:?}"),
                message: "request names several coordinator keys but cannot be split".into(),
            },
        )),
    }
}
