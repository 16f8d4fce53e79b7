//! A content centroid: the running mean of the unit vectors of records a consumer read (or a
//! partition holds), compared with new content by cosine similarity.

use super::cosine;

#[derive(Debug, Clone, PartialEq)]
pub struct Centroid {
    mean: Vec<f32>,
    count: u64,
    /// Once `count` reaches this, each new vector weighs 1/horizon: the mean then follows
    /// what a consumer reads now instead of averaging its whole history.
    horizon: u64,
}

impl Centroid {
    /// A plain running mean over every vector added.
    pub fn new(dims: usize) -> Self {
        Self::with_horizon(dims, u64::MAX)
    }

    /// A running mean that turns into an exponential moving average after `horizon` vectors.
    pub fn with_horizon(dims: usize, horizon: u64) -> Self {
        Self {
            mean: vec![0.0; dims],
            count: 0,
            horizon: horizon.max(1),
        }
    }

    /// Folds in one embedding (normalised here, so any embedder's output may be passed).
    /// Zero vectors (empty text) and vectors of another dimension are skipped: they say
    /// nothing about content. Returns whether `v` was counted.
    pub fn add(&mut self, v: &[f32]) -> bool {
        if v.len() != self.mean.len() {
            return false;
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return false;
        }
        self.count += 1;
        let weight = 1.0 / self.count.min(self.horizon) as f32;
        for (m, x) in self.mean.iter_mut().zip(v) {
            *m += (x / norm - *m) * weight;
        }
        true
    }

    /// Cosine similarity between `v` and the mean; 0 while nothing was added.
    pub fn similarity(&self, v: &[f32]) -> f32 {
        if self.count == 0 || v.len() != self.mean.len() {
            return 0.0;
        }
        cosine(&self.mean, v)
    }

    /// Vectors folded in so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn dims(&self) -> usize {
        self.mean.len()
    }

    /// The mean itself (not unit length: the more its vectors disagree, the shorter it is).
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Embedder, Hashing};
    use super::*;

    #[test]
    fn the_mean_of_vectors_and_its_count() {
        let mut c = Centroid::new(2);
        assert_eq!(c.similarity(&[1.0, 0.0]), 0.0, "empty centroid");
        assert!(c.add(&[2.0, 0.0]));
        assert!(c.add(&[0.0, 1.0]));
        assert_eq!(c.count(), 2);
        assert_eq!(c.mean(), &[0.5, 0.5]);
        let diag = std::f32::consts::FRAC_1_SQRT_2;
        assert!((c.similarity(&[1.0, 1.0]) - 1.0).abs() < 1e-6);
        assert!((c.similarity(&[1.0, 0.0]) - diag).abs() < 1e-6);
    }

    #[test]
    fn zero_and_wrong_sized_vectors_are_skipped() {
        let mut c = Centroid::new(3);
        assert!(!c.add(&[0.0, 0.0, 0.0]));
        assert!(!c.add(&[1.0, 0.0]));
        assert!(!c.add(&[f32::NAN, 1.0, 0.0]));
        assert_eq!(c.count(), 0);
        assert_eq!(c.similarity(&[1.0, 0.0]), 0.0);
    }

    #[test]
    fn a_horizon_lets_the_mean_follow_new_content() {
        let (mut plain, mut recent) = (Centroid::new(2), Centroid::with_horizon(2, 10));
        for _ in 0..1000 {
            plain.add(&[1.0, 0.0]);
            recent.add(&[1.0, 0.0]);
        }
        for _ in 0..50 {
            plain.add(&[0.0, 1.0]);
            recent.add(&[0.0, 1.0]);
        }
        assert!(plain.similarity(&[0.0, 1.0]) < 0.1);
        assert!(recent.similarity(&[0.0, 1.0]) > 0.95);
        assert_eq!(recent.count(), 1050);
    }

    #[test]
    fn a_centroid_of_one_kind_of_record_prefers_that_kind() {
        let h = Hashing::new(256).unwrap();
        let mut c = Centroid::new(h.dim());
        let orders = [
            r#"{"type":"order_created","order":"o-1","items":3}"#,
            r#"{"type":"order_created","order":"o-2","items":1}"#,
            r#"{"type":"order_shipped","order":"o-1","carrier":"dhl"}"#,
        ];
        for v in h.embed(&orders).unwrap() {
            c.add(&v);
        }
        let probe = h
            .embed(&[
                r#"{"type":"order_created","order":"o-77","items":2}"#,
                r#"{"type":"login_failed","user":"bob","ip":"10.0.0.1"}"#,
            ])
            .unwrap();
        let (order, login) = (c.similarity(&probe[0]), c.similarity(&probe[1]));
        assert!(order > login + 0.3, "order {order}, login {login}");
    }
}
