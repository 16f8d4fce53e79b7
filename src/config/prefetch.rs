//! The `[prefetch]` section: whether prefetch runs, which embedder turns record content into
//! vectors, and the bounded background pool that runs it.

use std::path::PathBuf;

use serde::Deserialize;

/// Tokenizer files the `minilm` embedder reads from `prefetch.minilm.tokenizer_dir`.
pub const MINILM_TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

/// Embedders `prefetch.embedder` may name.
pub const EMBEDDERS: [&str; 2] = ["hashing", "minilm"];

/// Range of `prefetch.hashing_dims`: below 32 collisions swamp the signal, above 4096 the
/// vectors cost more to keep per consumer and partition than they tell.
pub const HASHING_DIMS: std::ops::RangeInclusive<usize> = 32..=4096;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchConfig {
    /// Prefetch is exact (answers equal upstream's), so it is on unless switched off here:
    /// false is `mode = "off"`, whatever `mode` says.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// How much runs: "predictive" (default: everything), "sequential" (only each
    /// connection's read-ahead of its next fetch), "off" (nothing read before it is asked).
    #[serde(default)]
    pub mode: PrefetchMode,
    /// "hashing" (feature hashing, microseconds a record) or "minilm" (all-MiniLM-L6-v2 on
    /// ONNX Runtime from local files, milliseconds a record).
    #[serde(default = "default_embedder")]
    pub embedder: String,
    /// Vector size of the hashing embedder.
    #[serde(default = "default_hashing_dims")]
    pub hashing_dims: usize,
    /// Background threads embedding sampled records (never the request path).
    #[serde(default = "default_embed_threads")]
    pub embed_threads: usize,
    /// Samples waiting for an embedding thread; beyond this new samples are dropped (counted).
    #[serde(default = "default_embed_queue")]
    pub embed_queue: usize,
    /// Record sets delivered to consumers that are sampled per second (all connections
    /// together) for content embeddings and routing values; 0 = no sampling. Unset: 200
    /// with `hashing`, 2 with `minilm` (`samples_per_sec()`).
    #[serde(default)]
    pub samples_per_sec: Option<u32>,
    /// Bytes of pre-read records held at once (all consumers); beyond, new pre-reads are
    /// refused (counted).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// How long a pre-read waits to be asked for before it is dropped (counted).
    #[serde(default = "default_ttl_ms")]
    pub ttl_ms: u64,
    /// Bytes of records one consumer connection may hold read ahead of its position (its
    /// queue): polls continue from the end of what it holds while it has room and they bring
    /// records. All queues together stay within `max_bytes`. 0: no connection read-ahead.
    /// Unset: 4 MiB, or `max_bytes` when that is smaller (`queue_bytes()`).
    #[serde(default)]
    pub queue_bytes: Option<usize>,
    /// A connection's queue holds what its client takes within this at the rate it has been
    /// taking records (at least a full answer for each partition it fetches, at most
    /// `queue_bytes`): a slow consumer is not read far ahead of where it will stop.
    #[serde(default = "default_horizon_ms")]
    pub horizon_ms: u64,
    /// Partitions that several consumers (groups) fetch are read once for all of them: a
    /// read in flight is waited for, answers are kept for those behind.
    #[serde(default = "default_enabled")]
    pub share_reads: bool,
    /// Fields whose values make a consumer's routing-value histogram ("key", "header:NAME",
    /// "json:/pointer"), as in managed topics' `route_by`.
    #[serde(default = "default_routing_fields")]
    pub routing_fields: Vec<super::topic::RouteField>,
    #[serde(default)]
    pub minilm: MinilmConfig,
}

/// How much of prefetch runs (`prefetch.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchMode {
    /// Nothing is read before a client asks for it.
    Off,
    /// Each connection's queue: its next fetches polled ahead (`queue_bytes`).
    Sequential,
    /// Also pre-reads (rebalances), reads shared across consumers, and the profiles that
    /// drive them.
    #[default]
    Predictive,
}

impl PrefetchConfig {
    /// The mode in force (`enabled = false` is off).
    pub fn mode(&self) -> PrefetchMode {
        if self.enabled {
            self.mode
        } else {
            PrefetchMode::Off
        }
    }

    /// Bytes one connection's queue may hold (`queue_bytes`, by default 4 MiB within
    /// `max_bytes`).
    pub fn queue_bytes(&self) -> usize {
        self.queue_bytes
            .unwrap_or((4 * 1024 * 1024).min(self.max_bytes))
    }

    /// Whether the predictive parts run.
    pub fn predictive(&self) -> bool {
        self.mode() == PrefetchMode::Predictive
    }

    /// Record sets sampled per second. `minilm` embeds ~370 sentences/s on a core and each
    /// set gives up to 8: at 2 sets/s it took 3.1 % of a core whatever the record rate
    /// (BENCHMARKS.md, session 15; at 200 a whole core); `hashing` embeds millions a second.
    pub fn samples_per_sec(&self) -> u32 {
        self.samples_per_sec
            .unwrap_or(if self.embedder == "minilm" { 2 } else { 200 })
    }
}

/// Local files of the `minilm` embedder (`integration/testbed install` puts them in
/// `$SHARDGATE_CACHE/models/minilm/`). Nothing is downloaded at run time.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinilmConfig {
    /// ONNX Runtime's shared library, e.g. `libonnxruntime.so.1.31.0`.
    #[serde(default)]
    pub runtime_library: Option<PathBuf>,
    /// all-MiniLM-L6-v2 as ONNX (`model.onnx`).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Directory holding the files of `MINILM_TOKENIZER_FILES`.
    #[serde(default)]
    pub tokenizer_dir: Option<PathBuf>,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            mode: PrefetchMode::default(),
            embedder: default_embedder(),
            hashing_dims: default_hashing_dims(),
            embed_threads: default_embed_threads(),
            embed_queue: default_embed_queue(),
            samples_per_sec: None,
            max_bytes: default_max_bytes(),
            ttl_ms: default_ttl_ms(),
            horizon_ms: default_horizon_ms(),
            queue_bytes: None,
            share_reads: true,
            routing_fields: default_routing_fields(),
            minilm: MinilmConfig::default(),
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_embedder() -> String {
    "hashing".into()
}
fn default_hashing_dims() -> usize {
    256
}
fn default_embed_threads() -> usize {
    1
}
fn default_embed_queue() -> usize {
    1024
}
fn default_max_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_ttl_ms() -> u64 {
    10_000
}
fn default_horizon_ms() -> u64 {
    1_000
}
fn default_routing_fields() -> Vec<super::topic::RouteField> {
    use super::topic::RouteField;
    vec![
        RouteField::Json("/type".into()),
        RouteField::Json("/subject".into()),
    ]
}

type Invalid = (&'static str, String, String);

impl PrefetchConfig {
    /// Checks the values; `Err((field under prefetch., problem, fix))`. The minilm files are
    /// checked only while prefetch is enabled with that embedder: an operator switching
    /// prefetch off need not keep model files around.
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |f: &'static str, p: String, fix: &str| Err((f, p, fix.to_string()));
        if !EMBEDDERS.contains(&self.embedder.as_str()) {
            return bad(
                "embedder",
                format!("\"{}\" is not an embedder", self.embedder),
                "use \"hashing\" (the default) or \"minilm\"",
            );
        }
        if !HASHING_DIMS.contains(&self.hashing_dims) {
            return bad(
                "hashing_dims",
                format!("{} is out of range", self.hashing_dims),
                "use a value from 32 to 4096 (default 256)",
            );
        }
        if self.embed_threads == 0 || self.embed_threads > 64 {
            return bad(
                "embed_threads",
                format!("{} is out of range", self.embed_threads),
                "use a value from 1 to 64 (default 1); set prefetch.enabled = false to stop embedding",
            );
        }
        if self.embed_queue == 0 || self.embed_queue > 1_000_000 {
            return bad(
                "embed_queue",
                format!("{} is out of range", self.embed_queue),
                "use a value from 1 to 1000000 (default 1024)",
            );
        }
        if !(1024 * 1024..=64 * 1024 * 1024 * 1024).contains(&self.max_bytes) {
            return bad(
                "max_bytes",
                format!("{} is out of range", self.max_bytes),
                "use a value from 1048576 (1 MiB) to 68719476736 (64 GiB); default 67108864",
            );
        }
        if let Some(q) = self.queue_bytes
            && q > self.max_bytes
        {
            return bad(
                "queue_bytes",
                format!("{q} is more than prefetch.max_bytes ({})", self.max_bytes),
                "use a value from 0 (no connection read-ahead) to prefetch.max_bytes; default 4194304",
            );
        }
        if !(10..=600_000).contains(&self.horizon_ms) {
            return bad(
                "horizon_ms",
                format!("{} is out of range", self.horizon_ms),
                "use a value from 10 to 600000 (10 minutes); default 1000",
            );
        }
        if !(100..=600_000).contains(&self.ttl_ms) {
            return bad(
                "ttl_ms",
                format!("{} is out of range", self.ttl_ms),
                "use a value from 100 to 600000 (10 minutes); default 10000",
            );
        }
        if self.samples_per_sec() > 100_000 {
            return bad(
                "samples_per_sec",
                format!("{} is out of range", self.samples_per_sec()),
                "use a value from 0 (no sampling) to 100000 (default 200; 2 with minilm)",
            );
        }
        if self.routing_fields.len() > 16 {
            return bad(
                "routing_fields",
                format!("{} fields", self.routing_fields.len()),
                "name at most 16 fields",
            );
        }
        if self.mode() != PrefetchMode::Off && self.embedder == "minilm" {
            self.minilm.validate()?;
        }
        Ok(())
    }
}

impl MinilmConfig {
    /// Every file the minilm embedder opens exists, or the key naming it and the fix.
    pub fn validate(&self) -> Result<(), Invalid> {
        let install = "run `integration/testbed install` (it puts the files in $SHARDGATE_CACHE/models/minilm/) and point the key there";
        let file = |key: &'static str, path: &Option<PathBuf>| -> Result<(), Invalid> {
            match path {
                None => Err((
                    key,
                    "is not set while prefetch.embedder = \"minilm\"".into(),
                    install.into(),
                )),
                Some(p) if !p.is_file() => Err((
                    key,
                    format!("{} is not a readable file", p.display()),
                    install.into(),
                )),
                Some(_) => Ok(()),
            }
        };
        file("minilm.runtime_library", &self.runtime_library)?;
        file("minilm.model", &self.model)?;
        let Some(dir) = &self.tokenizer_dir else {
            return Err((
                "minilm.tokenizer_dir",
                "is not set while prefetch.embedder = \"minilm\"".into(),
                install.into(),
            ));
        };
        for name in MINILM_TOKENIZER_FILES {
            let p = dir.join(name);
            if !p.is_file() {
                return Err((
                    "minilm.tokenizer_dir",
                    format!("{} is not a readable file", p.display()),
                    format!(
                        "the directory must hold {}; {install}",
                        MINILM_TOKENIZER_FILES.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::MINIMAL;
    use crate::config::{ConfigError, Settings};

    fn parse(prefetch: &str) -> Result<Settings, ConfigError> {
        crate::config::tests::parse(&format!("{MINIMAL}{prefetch}"))
    }

    fn error(prefetch: &str) -> String {
        parse(prefetch).expect_err("an error").to_string()
    }

    #[test]
    fn defaults_are_on_with_the_hashing_embedder() {
        let p = parse("").unwrap().raw.prefetch;
        assert!(p.enabled);
        assert_eq!(p.embedder, "hashing");
        assert_eq!(
            (p.hashing_dims, p.embed_threads, p.embed_queue),
            (256, 1, 1024)
        );
        assert!(p.minilm.model.is_none());
        let seq = parse("[prefetch]\nmode = \"sequential\"\n")
            .unwrap()
            .raw
            .prefetch;
        assert_eq!(seq.mode(), super::PrefetchMode::Sequential);
        assert!(!seq.predictive());
        assert!(parse("[prefetch]\nmode = \"psychic\"\n").is_err());
        let off = parse("[prefetch]\nenabled = false\nmode = \"predictive\"\n")
            .unwrap()
            .raw
            .prefetch;
        assert_eq!(off.mode(), super::PrefetchMode::Off);
        assert!(!off.enabled);
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        for (text, key, fix) in [
            ("embedder = \"bert\"", "prefetch.embedder", "\"minilm\""),
            ("hashing_dims = 8", "prefetch.hashing_dims", "32 to 4096"),
            (
                "hashing_dims = 100000",
                "prefetch.hashing_dims",
                "32 to 4096",
            ),
            ("embed_threads = 0", "prefetch.embed_threads", "1 to 64"),
            ("embed_queue = 0", "prefetch.embed_queue", "1 to 1000000"),
            (
                "queue_bytes = 134217728",
                "prefetch.queue_bytes",
                "to prefetch.max_bytes",
            ),
        ] {
            let e = error(&format!("[prefetch]\n{text}\n"));
            assert!(e.contains(key) && e.contains(fix), "{text}: {e}");
        }
        // Garbage of the wrong type or an unknown key: TOML's message shows the line.
        for (text, key) in [
            ("hashing_dims = \"lots\"", "hashing_dims"),
            ("enabled = \"yes\"", "enabled"),
            ("embed_threads = -1", "embed_threads"),
            ("embedders = \"hashing\"", "embedders"),
        ] {
            let e = error(&format!("[prefetch]\n{text}\n"));
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn minilm_needs_all_three_paths_to_exist_while_enabled() {
        let e = error("[prefetch]\nembedder = \"minilm\"\n");
        assert!(e.contains("prefetch.minilm.runtime_library"), "{e}");
        assert!(
            e.contains("is not set") && e.contains("testbed install"),
            "{e}"
        );

        // Real files for the first two keys: the tokenizer directory is checked file by file.
        let here = env!("CARGO_MANIFEST_DIR");
        let e = error(&format!(
            "[prefetch]\nembedder = \"minilm\"\n[prefetch.minilm]\nruntime_library = \"{here}/Cargo.toml\"\nmodel = \"{here}/Cargo.toml\"\ntokenizer_dir = \"{here}\"\n"
        ));
        assert!(
            e.contains("prefetch.minilm.tokenizer_dir") && e.contains("tokenizer.json"),
            "{e}"
        );
        let e = error(&format!(
            "[prefetch]\nembedder = \"minilm\"\n[prefetch.minilm]\nruntime_library = \"{here}/Cargo.toml\"\nmodel = \"/nonexistent/model.onnx\"\n"
        ));
        assert!(
            e.contains("prefetch.minilm.model") && e.contains("/nonexistent/model.onnx"),
            "{e}"
        );

        // Switched off, the files are not needed.
        parse("[prefetch]\nenabled = false\nembedder = \"minilm\"\n").unwrap();
    }
}
