//! Produce rerouting for managed topics: each record goes to the partition of the shard its
//! routing hash falls in, whatever partition the client chose. Batches are decoded and
//! re-encoded per target partition with the client's compression codec; keys, values,
//! timestamps and every header (duplicates included, in order) are kept.

use std::collections::BTreeMap;
use std::time::Instant;

use kafka_protocol::messages::produce_request::PartitionProduceData;

use super::memory::{MemoryKey, ProducerMemory, Remembered};
use crate::protocol::codes::{CORRUPT_MESSAGE, INVALID_RECORD, REQUEST_TIMED_OUT};
use crate::protocol::records::{BatchInfo, Record, RecordsError, decode_batches_limited};
use crate::shards::registry::{Managed, Registry};
use crate::shards::routing::route_hash;

/// Records of one client partition bound for one upstream partition.
pub struct Write {
    pub target: i32,
    /// The client batch's compression and timestamp type.
    pub info: BatchInfo,
    pub records: Vec<Record>,
    /// Positions of these records in the client's partition data (for partial retries).
    pub indices: Vec<u32>,
}

/// What became of one partition entry of the client's request.
pub struct ClientPart {
    pub index: i32,
    /// Upstream writes of its records, one per target partition.
    pub writes: Vec<Write>,
    /// Refused before going upstream: (error code, message).
    pub refused: Option<(i16, String)>,
    /// Already written: answered from memory (base offset).
    pub remembered: Option<i64>,
    /// Key under which the outcome is remembered (idempotent clients).
    pub memory_key: Option<MemoryKey>,
    /// Records in the client's partition data.
    pub record_count: u32,
    /// Records an earlier attempt of this batch already wrote (skipped now).
    pub written_before: Option<Vec<bool>>,
}

/// The rerouted form of one topic of a produce request.
pub struct Rerouted {
    pub parts: Vec<ClientPart>,
    pub records_per_shard: BTreeMap<u32, (u64, u64)>,
}

pub fn reroute(
    registry: &Registry,
    m: &Managed,
    data: &[PartitionProduceData],
    memory: &ProducerMemory,
    transactional: bool,
    allowance: &mut usize,
) -> Rerouted {
    let mut parts = Vec::with_capacity(data.len());
    let mut per_shard: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut sampled = Vec::new();
    for pd in data {
        let mut part = ClientPart {
            index: pd.index,
            writes: vec![],
            refused: None,
            remembered: None,
            memory_key: None,
            record_count: 0,
            written_before: None,
        };
        if transactional {
            part.refused = Some((
                INVALID_RECORD,
                format!(
                    "transactions are not supported on managed topic {}",
                    m.config.name
                ),
            ));
            parts.push(part);
            continue;
        }
        let batches = match pd
            .records
            .clone()
            .map(|r| decode_batches_limited(r, allowance))
            .transpose()
        {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                part.refused = Some((refusal_code(&e), format!("cannot reroute records: {e}")));
                parts.push(part);
                continue;
            }
        };
        if let Some(info) = batches
            .iter()
            .find(|(i, _)| i.is_transactional() || i.is_control())
        {
            let what = if info.0.is_control() {
                "control batches"
            } else {
                "transactional batches"
            };
            part.refused = Some((
                INVALID_RECORD,
                format!(
                    "{what} are not supported on managed topic {}",
                    m.config.name
                ),
            ));
            parts.push(part);
            continue;
        }
        part.record_count = batches.iter().map(|(_, r)| r.len() as u32).sum();
        if let Some((info, _)) = batches.first()
            && info.producer_id >= 0
            && info.base_sequence >= 0
        {
            let key = MemoryKey {
                producer_id: info.producer_id,
                producer_epoch: info.producer_epoch,
                topic: m.config.name.clone(),
                partition: pd.index,
                base_sequence: info.base_sequence,
            };
            match memory.get(&key) {
                Some(Remembered::Done(offset)) => {
                    part.remembered = Some(offset);
                    parts.push(part);
                    continue;
                }
                Some(Remembered::Partial(written))
                    if written.len() == part.record_count as usize =>
                {
                    part.written_before = Some(written);
                }
                Some(Remembered::InFlight(until)) if Instant::now() < until => {
                    // The client gave up waiting before shardgate did: writing the retry now
                    // would duplicate whatever the first attempt writes.
                    part.refused = Some((
                        REQUEST_TIMED_OUT,
                        "an earlier attempt of this batch is still being written".into(),
                    ));
                    parts.push(part);
                    continue;
                }
                _ => {}
            }
            part.memory_key = Some(key);
        }
        let mut writes: BTreeMap<i32, Write> = BTreeMap::new();
        let mut index = 0u32;
        // Records are moved, not cloned, into their target's batch.
        for (info, records) in batches {
            // Records without any routing field or key stick to one shard per batch.
            let spread = &m.active()[(registry.next_spread() % m.active().len() as u64) as usize];
            for r in records {
                let i = index;
                index += 1;
                if part.written_before.as_ref().is_some_and(|w| w[i as usize]) {
                    continue;
                }
                let shard = match route_hash(&m.config.route_by, &r) {
                    Some(h) => {
                        sampled.push(h);
                        m.route(h)
                    }
                    None => spread,
                };
                let e = per_shard.entry(shard.id).or_default();
                e.0 += 1;
                e.1 += r.value.as_ref().map_or(0, |v| v.len() as u64)
                    + r.key.as_ref().map_or(0, |k| k.len() as u64);
                // Kafka accepts one batch per partition in a produce request, so every
                // record bound for a target joins one batch (with the first batch's codec).
                let w = writes.entry(shard.partition).or_insert_with(|| Write {
                    target: shard.partition,
                    info: info.clone(),
                    records: Vec::new(),
                    indices: Vec::new(),
                });
                w.records.push(r);
                w.indices.push(i);
            }
        }
        part.writes = writes.into_values().collect();
        parts.push(part);
    }
    registry.sample(&m.config.name, &sampled);
    Rerouted {
        parts,
        records_per_shard: per_shard,
    }
}

fn refusal_code(e: &RecordsError) -> i16 {
    match e {
        RecordsError::Magic(_) => crate::protocol::codes::UNSUPPORTED_VERSION,
        _ => CORRUPT_MESSAGE,
    }
}
