//! The `minilm` embedder: all-MiniLM-L6-v2 (384 dims, mean pooling, at most 256 tokens) run by
//! fastembed on ONNX Runtime, every file from a local path (`[prefetch.minilm]`), nothing
//! downloaded. ONNX Runtime is loaded with `ort::init_from(path)`, so a missing or wrong
//! library is an error here, not a panic on first use.
//!
//! A few milliseconds per sentence on one core: only the background `Pool` calls it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use fastembed::{
    InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel,
};
use ort::environment::Environment;

use super::{EmbedError, Embedder, normalize};
use crate::config::{MINILM_TOKENIZER_FILES, MinilmConfig};

/// all-MiniLM-L6-v2's hidden size.
pub const MINILM_DIMS: usize = 384;
/// The library's file name in the `onnxruntime==1.31.0` wheel (and in the testbed's cache).
pub const MINILM_RUNTIME_FILE: &str = "libonnxruntime.so.1.31.0";
/// Tokens per text; the model was trained on 256-token windows.
const MAX_TOKENS: usize = 256;
/// Texts per model run when a caller passes many at once (padding to the longest text of a
/// huge batch would waste memory and time).
const MODEL_BATCH: usize = 32;

const KEY_RUNTIME: &str = "prefetch.minilm.runtime_library";
const KEY_MODEL: &str = "prefetch.minilm.model";
const KEY_TOKENIZER: &str = "prefetch.minilm.tokenizer_dir";

/// The `[prefetch.minilm]` paths of a directory laid out as `integration/testbed install`
/// leaves `$SHARDGATE_CACHE/models/minilm/`: the runtime library, `model.onnx` and the
/// tokenizer files side by side.
pub fn minilm_files_in(dir: &Path) -> MinilmConfig {
    MinilmConfig {
        runtime_library: Some(dir.join(MINILM_RUNTIME_FILE)),
        model: Some(dir.join("model.onnx")),
        tokenizer_dir: Some(dir.to_path_buf()),
    }
}

/// ONNX Runtime is loaded once per process and `ort` allows one environment per process, so
/// the library's path and the environment live here, shared by every `MiniLm`.
static RUNTIME: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

fn environment(path: &Path) -> Result<Environment, EmbedError> {
    let runtime_error = |message: String| EmbedError::Runtime {
        path: path.to_path_buf(),
        message,
    };
    let file_error = |source| EmbedError::File {
        key: KEY_RUNTIME,
        path: path.to_path_buf(),
        source,
    };
    // Checked here, not left to dlopen: once a library is loaded `ort` accepts any path.
    if !std::fs::metadata(path).map_err(file_error)?.is_file() {
        return Err(runtime_error("not a file".into()));
    }
    let canonical = path.canonicalize().map_err(file_error)?;
    let mut runtime = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, env)) = runtime.as_ref() {
        if *loaded == canonical {
            return Ok(env.clone());
        }
        return Err(runtime_error(format!(
            "this process already loaded ONNX Runtime from {}, and only one can be loaded",
            loaded.display()
        )));
    }
    let env = ort::init_from(&canonical)
        .map_err(|e| runtime_error(e.to_string()))?
        .with_name("shardgate")
        .with_telemetry(false)
        .build()
        .map_err(|e| runtime_error(e.to_string()))?;
    tracing::info!(library = %canonical.display(), "ONNX Runtime loaded");
    *runtime = Some((canonical, env.clone()));
    Ok(env)
}

fn required<'a>(key: &'static str, path: &'a Option<PathBuf>) -> Result<&'a Path, EmbedError> {
    path.as_deref().ok_or_else(|| EmbedError::Config {
        key,
        problem: "is not set while prefetch.embedder = \"minilm\"".into(),
        fix: "run `integration/testbed install` (it puts the files in $SHARDGATE_CACHE/models/minilm/) and point the key there".into(),
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, EmbedError> {
    std::fs::read(path).map_err(|source| EmbedError::File {
        key,
        path: path.to_path_buf(),
        source,
    })
}

pub struct MiniLm {
    /// A session runs one batch at a time (`embed` takes `&mut`): one per embedding thread.
    sessions: Vec<Mutex<TextEmbedding>>,
    next: AtomicUsize,
}

impl MiniLm {
    /// Loads the runtime, the model and the tokenizer from `cfg`'s paths, with `sessions`
    /// model sessions of one ONNX Runtime thread each (so N embedding threads use N cores,
    /// never more). Every missing or unreadable file is an error naming its key and path.
    pub fn load(cfg: &MinilmConfig, sessions: usize) -> Result<Self, EmbedError> {
        let runtime = required(KEY_RUNTIME, &cfg.runtime_library)?;
        let model_path = required(KEY_MODEL, &cfg.model)?;
        let tokenizer_dir = required(KEY_TOKENIZER, &cfg.tokenizer_dir)?;
        // Every file is read before ONNX Runtime is touched.
        let onnx = read(KEY_MODEL, model_path)?;
        let [
            tokenizer_json,
            config_json,
            special_tokens_json,
            tokenizer_config_json,
        ] = MINILM_TOKENIZER_FILES.map(|name| tokenizer_dir.join(name));
        let tokenizer = TokenizerFiles {
            tokenizer_file: read(KEY_TOKENIZER, &tokenizer_json)?,
            config_file: read(KEY_TOKENIZER, &config_json)?,
            special_tokens_map_file: read(KEY_TOKENIZER, &special_tokens_json)?,
            tokenizer_config_file: read(KEY_TOKENIZER, &tokenizer_config_json)?,
        };
        let env = environment(runtime)?;
        let mut loaded = Vec::new();
        for _ in 0..sessions.max(1) {
            let model = UserDefinedEmbeddingModel::new(onnx.clone(), tokenizer.clone())
                .with_pooling(Pooling::Mean);
            let options = InitOptionsUserDefined::new()
                .with_environment(env.clone())
                .with_max_length(MAX_TOKENS)
                .with_intra_threads(1);
            let session = catch_unwind(AssertUnwindSafe(move || {
                TextEmbedding::try_new_from_user_defined(model, options)
            }))
            .map_err(|_| load_error(model_path, tokenizer_dir, None))?
            .map_err(|e| load_error(model_path, tokenizer_dir, Some(e)))?;
            loaded.push(Mutex::new(session));
        }
        let minilm = Self {
            sessions: loaded,
            next: AtomicUsize::new(0),
        };
        // A model of another size loads fine and fails later: check it embeds to 384 dims.
        let probe = minilm.embed(&["shardgate"])?;
        if probe.first().map(Vec::len) != Some(MINILM_DIMS) {
            return Err(EmbedError::Load {
                key: KEY_MODEL,
                what: "all-MiniLM-L6-v2",
                path: model_path.to_path_buf(),
                message: format!(
                    "it embeds to {:?} dimensions, not {MINILM_DIMS}",
                    probe.first().map(Vec::len)
                ),
            });
        }
        tracing::info!(
            model = %model_path.display(),
            sessions = minilm.sessions.len(),
            "minilm embedder loaded"
        );
        Ok(minilm)
    }

    /// A free session if there is one, else the next in turn.
    fn session(&self) -> MutexGuard<'_, TextEmbedding> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Relaxed);
        for i in 0..n {
            match self.sessions[(start + i) % n].try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.sessions[start % n]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// fastembed builds the session from the model first and the tokenizer second; its tokenizer
/// errors are the I/O "invalid data" and tokenizer-config kinds.
fn load_error(model: &Path, tokenizer_dir: &Path, e: Option<fastembed::Error>) -> EmbedError {
    let Some(e) = e else {
        return EmbedError::Load {
            key: KEY_MODEL,
            what: "an ONNX model",
            path: model.to_path_buf(),
            message: "fastembed panicked while loading it".into(),
        };
    };
    let tokenizer = matches!(
        &e,
        fastembed::Error::TokenizerConfig(_) | fastembed::Error::Io(_)
    );
    EmbedError::Load {
        key: if tokenizer { KEY_TOKENIZER } else { KEY_MODEL },
        what: if tokenizer {
            "a tokenizer"
        } else {
            "an ONNX model"
        },
        path: if tokenizer { tokenizer_dir } else { model }.to_path_buf(),
        message: e.to_string(),
    }
}

impl Embedder for MiniLm {
    fn name(&self) -> &'static str {
        "minilm"
    }

    fn dim(&self) -> usize {
        MINILM_DIMS
    }

    /// Blank texts give zero vectors without running the model (the model would embed the
    /// bare [CLS] [SEP] tokens into a vector that means nothing).
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = vec![Vec::new(); texts.len()];
        let (indices, inputs): (Vec<usize>, Vec<&str>) = texts
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.trim().is_empty())
            .map(|(i, t)| (i, *t))
            .unzip();
        if !inputs.is_empty() {
            let failed = |message: String| EmbedError::Embed {
                embedder: "minilm",
                texts: texts.len(),
                message,
            };
            let vectors = {
                let mut session = self.session();
                catch_unwind(AssertUnwindSafe(|| {
                    session.embed(&inputs, Some(MODEL_BATCH))
                }))
                .map_err(|_| failed("fastembed panicked".into()))?
                .map_err(|e| failed(e.to_string()))?
            };
            if vectors.len() != inputs.len() {
                return Err(failed(format!(
                    "{} vectors for {} texts",
                    vectors.len(),
                    inputs.len()
                )));
            }
            for (i, mut v) in indices.into_iter().zip(vectors) {
                normalize(&mut v);
                out[i] = v;
            }
        }
        for v in out.iter_mut().filter(|v| v.is_empty()) {
            *v = vec![0.0; MINILM_DIMS];
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> MinilmConfig {
        minilm_files_in(dir)
    }

    #[test]
    fn every_missing_file_is_an_error_naming_its_key_and_path() {
        let dir = std::env::temp_dir().join(format!("sg-minilm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let unset = MiniLm::load(&MinilmConfig::default(), 1).err().unwrap();
        assert!(unset.to_string().contains(KEY_RUNTIME), "{unset}");

        // Nothing in the directory: the model is read first.
        let e = MiniLm::load(&files(&dir), 1).err().unwrap().to_string();
        assert!(e.contains(KEY_MODEL) && e.contains("model.onnx"), "{e}");

        std::fs::write(dir.join("model.onnx"), b"not a model").unwrap();
        let e = MiniLm::load(&files(&dir), 1).err().unwrap().to_string();
        assert!(
            e.contains(KEY_TOKENIZER) && e.contains("tokenizer.json"),
            "{e}"
        );

        for name in MINILM_TOKENIZER_FILES {
            std::fs::write(dir.join(name), b"{}").unwrap();
        }
        // All files there but no runtime library: an error, not a panic.
        let e = MiniLm::load(&files(&dir), 1).err().unwrap().to_string();
        assert!(
            e.contains(KEY_RUNTIME) && e.contains(MINILM_RUNTIME_FILE),
            "{e}"
        );

        // A runtime "library" that is not one: dlopen's error, still no panic.
        std::fs::write(dir.join(MINILM_RUNTIME_FILE), b"not a library").unwrap();
        let e = MiniLm::load(&files(&dir), 1).err().unwrap().to_string();
        assert!(e.contains(KEY_RUNTIME), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
