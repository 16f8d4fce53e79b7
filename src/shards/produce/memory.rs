//! What idempotent client producers already wrote to managed topics, so their retries are
//! answered from memory instead of written twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

/// One client batch: its producer, the client's topic partition and base sequence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemoryKey {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub topic: String,
    pub partition: i32,
    pub base_sequence: i32,
}

/// What an earlier attempt of a client batch achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remembered {
    /// Every record written; the answer's base offset.
    Done(i64),
    /// Some records written (by position in the batch); a retry writes only the others.
    Partial(Vec<bool>),
    /// Being written, at the latest until then.
    InFlight(Instant),
}

/// The last batches idempotent client producers wrote to managed topics, so that a retry of a
/// batch already written (wholly or in part) does not write it twice. Bounded: the oldest
/// entries go first (a producer retries only its last few in-flight batches).
pub struct ProducerMemory {
    inner: Mutex<(HashMap<MemoryKey, Remembered>, VecDeque<MemoryKey>)>,
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
    pub fn get(&self, key: &MemoryKey) -> Option<Remembered> {
        self.inner
            .lock()
            .expect("producer memory")
            .0
            .get(key)
            .cloned()
    }

    pub fn remember(&self, key: MemoryKey, what: Remembered) {
        let mut g = self.inner.lock().expect("producer memory");
        let (map, order) = &mut *g;
        if map.insert(key.clone(), what).is_none() {
            order.push_back(key);
            while order.len() > self.capacity {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }
}
