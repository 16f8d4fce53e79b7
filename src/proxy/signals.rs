//! Wake-ups for fetches waiting for data: every successful produce through shardgate bumps a
//! counter in one of a fixed set of slots chosen by (topic, partition). A waiting fetch watches
//! the slots of its partitions, so it answers as soon as data arrives instead of at its next
//! poll. Striping keeps memory fixed however many partitions exist; a collision only causes a
//! spurious (harmless) re-fetch.

use tokio::sync::watch;
use xxhash_rust::xxh3::xxh3_64;

pub struct PartitionSignals {
    slots: Vec<watch::Sender<u64>>,
}

impl PartitionSignals {
    pub fn new(n: usize) -> Self {
        Self {
            slots: (0..n.max(1)).map(|_| watch::channel(0).0).collect(),
        }
    }

    pub fn slot(&self, topic: &str, partition: i32) -> usize {
        let mut key = Vec::with_capacity(topic.len() + 4);
        key.extend_from_slice(topic.as_bytes());
        key.extend_from_slice(&partition.to_be_bytes());
        (xxh3_64(&key) % self.slots.len() as u64) as usize
    }

    pub fn notify(&self, topic: &str, partition: i32) {
        self.slots[self.slot(topic, partition)].send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self, slot: usize) -> watch::Receiver<u64> {
        self.slots[slot].subscribe()
    }
}
