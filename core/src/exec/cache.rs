//! Node results kept between runs, keyed by what determines them, within a memory bound (LRU).

use std::collections::HashMap;

use crate::exec::key::Key;
use crate::value::Value;

struct Slot {
    values: Vec<Value>,
    bytes: usize,
    last_used: u64,
}

/// An LRU cache of node outputs bounded by their approximate size in bytes.
pub struct Cache {
    slots: HashMap<Key, Slot>,
    limit: usize,
    used: usize,
    clock: u64,
}

impl Cache {
    /// A cache holding at most `limit_bytes` of values. A single result larger than that is not kept.
    pub fn new(limit_bytes: usize) -> Cache {
        Cache { slots: HashMap::new(), limit: limit_bytes, used: 0, clock: 0 }
    }

    /// The outputs stored under `key` (shallow copies), marking them recently used.
    pub fn get(&mut self, key: &Key) -> Option<Vec<Value>> {
        self.clock += 1;
        let slot = self.slots.get_mut(key)?;
        slot.last_used = self.clock;
        Some(slot.values.clone())
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.slots.contains_key(key)
    }

    /// Stores outputs under `key`, evicting the least recently used results until they fit.
    pub fn insert(&mut self, key: Key, values: Vec<Value>) {
        let bytes: usize = values.iter().map(Value::bytes).sum();
        self.remove(&key);
        if bytes > self.limit {
            return;
        }
        while self.used + bytes > self.limit {
            let Some(oldest) = self.slots.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| *k) else { break };
            self.remove(&oldest);
        }
        self.clock += 1;
        self.used += bytes;
        self.slots.insert(key, Slot { values, bytes, last_used: self.clock });
    }

    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.slots.remove(key) {
            self.used -= old.bytes;
        }
    }

    /// Number of results held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Approximate bytes held.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        [n; 32]
    }

    fn text(len: usize) -> Vec<Value> {
        // Value::String counts len + 24 bytes.
        vec![Value::String("x".repeat(len - 24))]
    }

    #[test]
    fn evicts_least_recently_used_within_the_bound() {
        let mut c = Cache::new(300);
        c.insert(key(1), text(100));
        c.insert(key(2), text(100));
        c.insert(key(3), text(100));
        assert!(c.get(&key(1)).is_some()); // 1 is now the most recent
        c.insert(key(4), text(100));
        assert!(c.contains(&key(1)) && !c.contains(&key(2)) && c.contains(&key(3)) && c.contains(&key(4)));
        assert_eq!(c.used_bytes(), 300);
    }

    #[test]
    fn an_oversized_result_is_not_kept_and_evicts_nothing() {
        let mut c = Cache::new(150);
        c.insert(key(1), text(100));
        c.insert(key(2), text(200));
        assert!(c.contains(&key(1)) && !c.contains(&key(2)));
    }

    #[test]
    fn reinserting_a_key_replaces_its_bytes() {
        let mut c = Cache::new(1000);
        c.insert(key(1), text(100));
        c.insert(key(1), text(50));
        assert_eq!((c.len(), c.used_bytes()), (1, 50));
    }
}
