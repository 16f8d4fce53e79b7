//! Produce rerouting for managed topics: each record goes to the partition of the shard its
//! routing hash falls in, whatever partition the client chose. Batches are decoded and
//! re-encoded per target partition with the client's compression codec; keys, values,
//! timestamps and every header (duplicates included, in order) are kept.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::PartitionProduceData;

use crate::protocol::records::{
    BatchInfo, Record, RecordsError, decode_batches_limited, encode_batch,
};
use crate::shards::registry::{Managed, Registry};
use crate::shards::routing::route_hash;

pub const CORRUPT_MESSAGE: i16 = 2;
pub const INVALID_RECORD: i16 = 87;

/// What became of one partition entry of the client's request.
#[derive(Debug, Clone)]
pub struct ClientPart {
    pub index: i32,
    /// Upstream partitions its records went to.
    pub targets: Vec<i32>,
    /// Refused before going upstream: (error code, message).
    pub refused: Option<(i16, String)>,
    /// Already written: answered from memory (base offset).
    pub remembered: Option<i64>,
    /// Key under which a successful write is remembered.
    pub memory_key: Option<MemoryKey>,
    /// Whether its records alone make up one target's batch (then the upstream base offset is
    /// this batch's base offset; otherwise the answer is -1, as for a batch spread over
    /// partitions).
    pub sole_writer: bool,
}

/// The rerouted form of one topic of a produce request.
pub struct Rerouted {
    pub parts: Vec<ClientPart>,
    /// Target partition → concatenated record batches.
    pub targets: BTreeMap<i32, Bytes>,
    pub records_per_shard: BTreeMap<u32, (u64, u64)>,
}

pub fn reroute(
    registry: &Registry,
    m: &Managed,
    data: &[PartitionProduceData],
    memory: &ProducerMemory,
    transactional: bool,
    max_decompressed: usize,
) -> Rerouted {
    let mut parts = Vec::with_capacity(data.len());
    let mut targets: BTreeMap<i32, (BatchInfo, Vec<Record>)> = BTreeMap::new();
    let mut writers: BTreeMap<i32, usize> = BTreeMap::new();
    let mut per_shard: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut sampled = Vec::new();
    for pd in data {
        let mut part = ClientPart {
            index: pd.index,
            targets: vec![],
            refused: None,
            remembered: None,
            memory_key: None,
            sole_writer: false,
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
            .map(|r| decode_batches_limited(r, max_decompressed))
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
            if let Some(offset) = memory.get(&key) {
                part.remembered = Some(offset);
                parts.push(part);
                continue;
            }
            part.memory_key = Some(key);
        }
        let mut part_targets: BTreeMap<i32, usize> = BTreeMap::new();
        // Records are moved, not cloned, into their target's batch.
        for (info, records) in batches {
            // Records without any routing field or key stick to one shard per batch.
            let spread = &m.active()[(registry.next_spread() % m.active().len() as u64) as usize];
            for r in records {
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
                *part_targets.entry(shard.partition).or_default() += 1;
                // Kafka accepts one batch per partition in a produce request, so every
                // record bound for a target joins one batch (with the first batch's codec).
                targets
                    .entry(shard.partition)
                    .or_insert_with(|| (info.clone(), Vec::new()))
                    .1
                    .push(r);
            }
        }
        part.targets = part_targets.keys().copied().collect();
        for t in &part.targets {
            *writers.entry(*t).or_default() += 1;
        }
        parts.push(part);
    }
    for p in &mut parts {
        p.sole_writer = p.targets.len() == 1 && writers.get(&p.targets[0]) == Some(&1);
    }
    registry.sample(&m.config.name, &sampled);
    let mut encoded = BTreeMap::new();
    for (t, (info, records)) in targets {
        let out = BatchInfo {
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            partition_leader_epoch: -1,
            ..info
        };
        let refs: Vec<&Record> = records.iter().collect();
        match encode_batch(&refs, &out) {
            Ok(b) => {
                encoded.insert(t, b);
            }
            Err(e) => {
                // Encoding records we just decoded fails only on a codec error: refuse the
                // client partitions that had records for this target.
                for p in parts.iter_mut().filter(|p| p.targets.contains(&t)) {
                    p.refused = Some((CORRUPT_MESSAGE, format!("cannot re-encode records: {e}")));
                }
            }
        }
    }
    Rerouted {
        parts,
        targets: encoded,
        records_per_shard: per_shard,
    }
}

fn refusal_code(e: &RecordsError) -> i16 {
    match e {
        RecordsError::Magic(_) => crate::protocol::codes::UNSUPPORTED_VERSION,
        _ => CORRUPT_MESSAGE,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemoryKey {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub topic: String,
    pub partition: i32,
    pub base_sequence: i32,
}

/// The last batches idempotent client producers wrote to managed topics, so that a retry of a
/// batch already written is answered from here instead of being written twice. Bounded: the
/// oldest entries go first (a producer retries only its last few in-flight batches).
pub struct ProducerMemory {
    inner: Mutex<(HashMap<MemoryKey, i64>, VecDeque<MemoryKey>)>,
    capacity: usize,
}

impl Default for ProducerMemory {
    fn default() -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            capacity: 100_000,
        }
    }
}

impl ProducerMemory {
    pub fn get(&self, key: &MemoryKey) -> Option<i64> {
        self.inner
            .lock()
            .expect("producer memory")
            .0
            .get(key)
            .copied()
    }

    pub fn remember(&self, key: MemoryKey, base_offset: i64) {
        let mut g = self.inner.lock().expect("producer memory");
        let (map, order) = &mut *g;
        if map.insert(key.clone(), base_offset).is_none() {
            order.push_back(key);
            while order.len() > self.capacity {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }
}
