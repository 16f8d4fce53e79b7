//! Reading kept answers the way Kafka answers a fetch: from the batch holding an offset, cut
//! at whole batches, with the aborted transactions that apply.

use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan;

/// Batch header fields read here (v2 record batches; offsets from the batch start).
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const ATTRIBUTES_AT: usize = 21;
const LAST_DELTA_AT: usize = 23;
const PRODUCER_ID_AT: usize = 43;
const HEADER_LEN: usize = 61;
/// Attribute bit of a control batch (a transaction's commit or abort marker).
const CONTROL: i16 = 0x20;

/// What Kafka answers to a fetch from `z` inside `p` (an answer read from an earlier
/// offset): the whole batches from the first one ending at or after `z`, and the aborted
/// transactions still open there (a transaction whose control batch lies before that batch
/// ended before `z`). Also the leader epoch of the first batch served. None when no whole
/// batch ends at or after `z`.
pub(super) fn from_offset(p: &PartitionData, z: i64) -> Option<(PartitionData, i32)> {
    let records = p.records.as_ref()?;
    let be_i64 = |at: usize| i64::from_be_bytes(records[at..at + 8].try_into().expect("8"));
    let be_i32 = |at: usize| i32::from_be_bytes(records[at..at + 4].try_into().expect("4"));
    let mut pos = 0usize;
    // Control batches passed: (producer id, offset).
    let mut ended: Vec<(i64, i64)> = Vec::new();
    while records.len() >= pos + HEADER_LEN {
        let base = be_i64(pos);
        let len = be_i32(pos + 8);
        // Old message formats (magic 0 and 1) have no such header: not served from inside.
        if len < 0 || pos + 12 + len as usize > records.len() || records[pos + MAGIC_AT] != 2 {
            return None;
        }
        let last = base + be_i32(pos + LAST_DELTA_AT) as i64;
        if last >= z {
            let mut out = p.clone();
            out.records = Some(records.slice(pos..));
            if let Some(aborted) = out.aborted_transactions.as_mut() {
                aborted.retain(|a| {
                    !ended
                        .iter()
                        .any(|(pid, at)| *pid == a.producer_id.0 && *at >= a.first_offset)
                });
            }
            return Some((out, be_i32(pos + LEADER_EPOCH_AT)));
        }
        let attributes = i16::from_be_bytes(
            records[pos + ATTRIBUTES_AT..pos + ATTRIBUTES_AT + 2]
                .try_into()
                .expect("2"),
        );
        if attributes & CONTROL != 0 {
            ended.push((be_i64(pos + PRODUCER_ID_AT), base));
        }
        pos += 12 + len as usize;
    }
    None
}

/// `p` with its records cut at whole batches to `limit` bytes and the aborted transactions
/// that start within what is kept; None when the first batch alone exceeds `limit` (Kafka
/// sends such a batch only as the first partition with data in a response, which only the
/// request's own read can know: the fetch goes upstream).
pub(super) fn cut(p: &PartitionData, limit: usize) -> Option<PartitionData> {
    let mut out = p.clone();
    let Some(records) = &p.records else {
        return Some(out);
    };
    let (keep, next) = plan::batches_within(records, limit);
    if keep == 0 {
        return None;
    }
    if let (Some(aborted), Some(next)) = (out.aborted_transactions.as_mut(), next) {
        aborted.retain(|a| a.first_offset < next);
    }
    out.records = Some(records.slice(..keep));
    Some(out)
}
