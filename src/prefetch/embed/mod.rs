//! Embedders behind one trait: record text in, unit-length vectors out, so that cosine
//! similarity compares a partition's recent content with what a consumer has been reading.
//!
//! - `hashing` (the default): word and character n-grams feature-hashed into a fixed-size
//!   vector; a fraction of a microsecond for a short record, no model files.
//! - `minilm`: all-MiniLM-L6-v2 on ONNX Runtime (fastembed), from local files only; a few
//!   milliseconds a sentence, so it only ever runs on the background `Pool`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::PrefetchConfig;

mod centroid;
mod hashing;
mod minilm;
mod pool;

pub use centroid::Centroid;
pub use hashing::Hashing;
pub use minilm::{MINILM_DIMS, MINILM_RUNTIME_FILE, MiniLm, minilm_files_in};
pub use pool::{Embedded, MAX_SAMPLE_BYTES, Pool, PoolStats};

/// Turns texts into vectors of `dim()` floats, each of L2 norm 1 (or all zeros when a text
/// has nothing to embed, e.g. it is empty), so that a dot product is a cosine.
pub trait Embedder: Send + Sync {
    /// The configured name (`prefetch.embedder`), for logs and metrics.
    fn name(&self) -> &'static str;
    fn dim(&self) -> usize;
    /// One vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A setting the chosen embedder needs is missing or out of range.
    #[error("config key `{key}`: {problem}; {fix}")]
    Config {
        key: &'static str,
        problem: String,
        fix: String,
    },
    /// A file the embedder reads is missing or unreadable.
    #[error("config key `{key}`: cannot read {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The ONNX Runtime library could not be loaded (or another one already was).
    #[error(
        "config key `prefetch.minilm.runtime_library`: cannot load ONNX Runtime from {path}: {message}"
    )]
    Runtime { path: PathBuf, message: String },
    /// A file was read but is not what the embedder expects (a corrupt model, a tokenizer
    /// file of another format).
    #[error("config key `{key}`: {path} does not load as {what}: {message}")]
    Load {
        key: &'static str,
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// Embedding itself failed.
    #[error("the {embedder} embedder failed on {texts} texts: {message}")]
    Embed {
        embedder: &'static str,
        texts: usize,
        message: String,
    },
    #[error("cannot start embedding thread {index}: {source}")]
    Spawn {
        index: usize,
        source: std::io::Error,
    },
}

/// The embedder `cfg` selects, ready to use (`settings.raw.prefetch`; the config was
/// validated at start, but files are checked again here because they are read only now).
pub fn from_config(cfg: &PrefetchConfig) -> Result<Arc<dyn Embedder>, EmbedError> {
    let embedder: Arc<dyn Embedder> = match cfg.embedder.as_str() {
        "hashing" => Arc::new(Hashing::new(cfg.hashing_dims)?),
        // One model session per embedding thread: a session runs one batch at a time.
        "minilm" => Arc::new(MiniLm::load(&cfg.minilm, cfg.embed_threads)?),
        other => {
            return Err(EmbedError::Config {
                key: "prefetch.embedder",
                problem: format!("\"{other}\" is not an embedder"),
                fix: "use \"hashing\" (the default) or \"minilm\"".into(),
            });
        }
    };
    tracing::info!(
        embedder = embedder.name(),
        dims = embedder.dim(),
        "prefetch embedder ready"
    );
    Ok(embedder)
}

/// Cosine similarity; 0 when either vector is all zeros. Vectors of different lengths are
/// compared over the shorter one (they never are when both come from one embedder).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len(), "vectors of different embedders");
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
}

/// Scales `v` to L2 norm 1 in place (a zero vector stays zero); returns the norm it had.
pub fn normalize(v: &mut [f32]) -> f32 {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        let inv = 1.0 / norm;
        v.iter_mut().for_each(|x| *x *= inv);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_parallel_opposite_orthogonal_and_zero_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert!((cosine(&[1.0, 2.0], &[-1.0, -2.0]) + 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn normalize_gives_unit_length_and_leaves_zero_alone() {
        let mut v = [3.0, 4.0];
        assert_eq!(normalize(&mut v), 5.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut z = [0.0; 3];
        assert_eq!(normalize(&mut z), 0.0);
        assert_eq!(z, [0.0; 3]);
    }

    #[test]
    fn from_config_builds_the_hashing_embedder_and_names_bad_settings() {
        let cfg = PrefetchConfig {
            hashing_dims: 128,
            ..PrefetchConfig::default()
        };
        let e = from_config(&cfg).unwrap();
        assert_eq!((e.name(), e.dim()), ("hashing", 128));
        let v = e.embed(&["order created for user 42"]).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].len(), 128);

        let bad = PrefetchConfig {
            embedder: "word2vec".into(),
            ..PrefetchConfig::default()
        };
        let msg = from_config(&bad).err().unwrap().to_string();
        assert!(msg.contains("prefetch.embedder"), "{msg}");

        // minilm without its files: an error naming the key, not a panic.
        let minilm = PrefetchConfig {
            embedder: "minilm".into(),
            ..PrefetchConfig::default()
        };
        let msg = from_config(&minilm).err().unwrap().to_string();
        assert!(msg.contains("prefetch.minilm.runtime_library"), "{msg}");
    }
}
