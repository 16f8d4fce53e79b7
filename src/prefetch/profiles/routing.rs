//! Routing-value histograms: how often each value of `prefetch.routing_fields` appears among
//! sampled records, per connection (what it was delivered) and per partition (what it has
//! carried lately). Their cosine similarity is the routing half of a partition's rank.

use std::collections::{BTreeMap, HashMap};

/// Distinct (field, value) pairs counted per histogram (client-supplied values: bounded).
const MAX_VALUES: usize = 256;
/// Routing values shown per field.
const TOP_VALUES: usize = 5;

#[derive(Debug, Default)]
pub(super) struct Histogram {
    counts: HashMap<(String, String), u64>,
    total: u64,
    /// Beyond this total the counts halve (the histogram follows recent records); 0: never.
    horizon: u64,
}

impl Histogram {
    /// A histogram of recent records: counts halve each time they total `horizon`.
    pub fn recent(horizon: u64) -> Self {
        Self {
            horizon,
            ..Self::default()
        }
    }

    pub fn add(&mut self, field: &str, value: &str) {
        let key = (field.to_string(), value.to_string());
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
        } else if self.counts.len() < MAX_VALUES {
            self.counts.insert(key, 1);
        } else {
            return;
        }
        self.total += 1;
        if self.horizon > 0 && self.total >= self.horizon {
            self.counts.retain(|_, n| {
                *n /= 2;
                *n > 0
            });
            self.total = self.counts.values().sum();
        }
    }

    /// Cosine similarity of the two histograms as vectors over (field, value); None when
    /// either is empty. Counts are never negative: 0 (nothing in common) to 1.
    pub fn cosine(&self, other: &Histogram) -> Option<f32> {
        if self.total == 0 || other.total == 0 {
            return None;
        }
        let norm = |h: &Histogram| h.counts.values().map(|n| (*n as f64).powi(2)).sum::<f64>();
        let dot: f64 = self
            .counts
            .iter()
            .filter_map(|(k, n)| Some(*n as f64 * *other.counts.get(k)? as f64))
            .sum();
        Some((dot / (norm(self) * norm(other)).sqrt()) as f32)
    }
}

/// The most frequent values per field over `histograms`, most frequent first.
pub(super) fn top_values<'a>(
    histograms: impl Iterator<Item = &'a Histogram>,
) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut counts: HashMap<(&str, &str), u64> = HashMap::new();
    for h in histograms {
        for ((f, v), n) in &h.counts {
            *counts.entry((f.as_str(), v.as_str())).or_default() += n;
        }
    }
    let mut by_field: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for ((f, v), n) in counts {
        by_field
            .entry(f.to_string())
            .or_default()
            .push((v.to_string(), n));
    }
    for values in by_field.values_mut() {
        values.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        values.truncate(TOP_VALUES);
    }
    by_field
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_mixes_score_high_disjoint_ones_zero_and_old_counts_fade() {
        let mut consumer = Histogram::default();
        for _ in 0..9 {
            consumer.add("type", "pets");
        }
        consumer.add("type", "markets");
        let mut pets = Histogram::recent(1000);
        let mut markets = Histogram::recent(1000);
        for _ in 0..10 {
            pets.add("type", "pets");
            markets.add("type", "markets");
        }
        let (p, m) = (
            consumer.cosine(&pets).unwrap(),
            consumer.cosine(&markets).unwrap(),
        );
        assert!(p > 0.99 && m < 0.12, "pets {p}, markets {m}");
        assert_eq!(pets.cosine(&markets), Some(0.0));
        assert_eq!(Histogram::default().cosine(&pets), None);
        // A partition that switched to markets: its pets counts halve away.
        let mut switched = Histogram::recent(64);
        for _ in 0..60 {
            switched.add("type", "pets");
        }
        for _ in 0..300 {
            switched.add("type", "markets");
        }
        assert!(switched.cosine(&markets).unwrap() > 0.99);
        assert!(switched.total < 64);
    }

    #[test]
    fn values_beyond_the_bound_are_not_counted() {
        let mut h = Histogram::default();
        for i in 0..MAX_VALUES + 10 {
            h.add("user", &i.to_string());
        }
        assert_eq!((h.counts.len(), h.total), (MAX_VALUES, MAX_VALUES as u64));
        let top = top_values(std::iter::once(&h));
        assert_eq!(top["user"].len(), TOP_VALUES);
    }
}
