//! The `minilm` embedder with the real model: all-MiniLM-L6-v2 and ONNX Runtime as
//! `integration/testbed install` leaves them in `$SHARDGATE_CACHE/models/minilm/`
//! (`SHARDGATE_MINILM_DIR` overrides). No Kafka needed, but the files are: `#[ignore]`d like
//! the other testbed tests and run by `integration/run-tests`, which installs them first. A
//! missing file fails these tests; it never skips them.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use shardgate::config::{Config, ConfigError, MinilmConfig, Settings};
use shardgate::prefetch::embed::{
    Centroid, EmbedError, Embedded, Embedder, MINILM_DIMS, MINILM_RUNTIME_FILE, MiniLm, Pool,
    cosine, from_config, minilm_files_in,
};

fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("SHARDGATE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::cache().join("models/minilm"));
    assert!(
        dir.join("model.onnx").is_file(),
        "{} has no model.onnx: run `integration/testbed install`",
        dir.display()
    );
    dir
}

/// A config file selecting minilm with the files of `minilm_dir()` but `runtime_library`.
fn config(prefetch_extra: &str, runtime_library: &Path) -> Result<Settings, ConfigError> {
    let dir = minilm_dir();
    let text = format!(
        "[listener]\nbind = \"127.0.0.1:29092\"\n[upstream]\nbootstrap = [\"127.0.0.1:19092\"]\n\
         [prefetch]\nembedder = \"minilm\"\n{prefetch_extra}\n[prefetch.minilm]\n\
         runtime_library = \"{}\"\nmodel = \"{}\"\ntokenizer_dir = \"{}\"\n",
        runtime_library.display(),
        dir.join("model.onnx").display(),
        dir.display()
    );
    Config::parse(&text, Path::new("embed-test.toml"))
}

fn load() -> MiniLm {
    MiniLm::load(&minilm_files_in(&minilm_dir()), 1).expect("minilm loads")
}

fn sim(e: &dyn Embedder, a: &str, b: &str) -> f32 {
    let v = e.embed(&[a, b]).unwrap();
    cosine(&v[0], &v[1])
}

#[test]
#[ignore = "needs the testbed's model files: integration/run-tests"]
fn minilm_ranks_paraphrases_above_unrelated_sentences() {
    let m = load();
    assert_eq!((m.name(), m.dim()), ("minilm", MINILM_DIMS));
    let cat = "The cat sits on the mat";
    let para = sim(&m, cat, "A cat is sitting on a mat");
    let unrelated = sim(&m, cat, "Stock markets fell sharply today");
    println!("minilm cosine: paraphrase {para:.4}, unrelated {unrelated:.4}");
    assert!(para > 0.85, "paraphrase {para}");
    assert!(unrelated < 0.3, "unrelated {unrelated}");

    // Unit vectors, the same vector for the same text whatever the batch, zeros for blanks.
    let batch = m
        .embed(&[cat, "", "Stock markets fell sharply today", cat])
        .unwrap();
    assert_eq!(batch.len(), 4);
    for v in [&batch[0], &batch[2]] {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    assert!(batch[1].iter().all(|x| *x == 0.0));
    let alone = m.embed(&[cat]).unwrap().remove(0);
    assert!(cosine(&alone, &batch[3]) > 0.9999);
    assert!(cosine(&batch[0], &batch[3]) > 0.9999);

    // Content a consumer reads pulls its centroid towards similar content.
    let mut c = Centroid::new(MINILM_DIMS);
    for v in m
        .embed(&[
            "Shipment delayed at the warehouse",
            "Parcel left the distribution centre",
            "Delivery rescheduled for tomorrow",
        ])
        .unwrap()
    {
        assert!(c.add(&v));
    }
    let probe = m
        .embed(&[
            "The package is out for delivery",
            "Quarterly revenue beat expectations",
        ])
        .unwrap();
    let (near, far) = (c.similarity(&probe[0]), c.similarity(&probe[1]));
    println!("minilm centroid: shipping {near:.4}, finance {far:.4}");
    assert!(near > far + 0.2, "shipping {near}, finance {far}");
}

#[test]
#[ignore = "needs the testbed's model files: integration/run-tests"]
fn minilm_from_the_config_file_runs_on_the_pool() {
    let dir = minilm_dir();
    let settings = config(
        "embed_threads = 1\nembed_queue = 8",
        &dir.join(MINILM_RUNTIME_FILE),
    )
    .expect("valid config");
    let embedder = from_config(&settings.raw.prefetch).expect("minilm from config");
    assert_eq!(embedder.dim(), MINILM_DIMS);

    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let pool = Pool::from_config(
        &settings.raw.prefetch,
        Arc::clone(&embedder),
        move |e: Embedded<&'static str>| {
            let _ = tx.lock().unwrap().send(e);
        },
    )
    .unwrap();
    assert!(pool.try_submit("a", "The cat sits on the mat"));
    assert!(pool.try_submit("b", "A cat is sitting on a mat"));
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(rx.recv_timeout(Duration::from_secs(60)).expect("embedded"));
    }
    got.sort_by_key(|e| e.key);
    assert!(cosine(&got[0].vector, &got[1].vector) > 0.85);
    assert_eq!(pool.stats().dropped, 0);
}

#[test]
#[ignore = "needs the testbed's model files: integration/run-tests"]
fn minilm_without_its_runtime_library_is_an_error_not_a_panic() {
    let dir = minilm_dir();
    let missing = MinilmConfig {
        runtime_library: Some(dir.join("no-such-libonnxruntime.so")),
        ..minilm_files_in(&dir)
    };
    let Err(e) = MiniLm::load(&missing, 1) else {
        panic!("loaded without a runtime library")
    };
    let msg = e.to_string();
    println!("missing library: {msg}");
    assert!(matches!(e, EmbedError::File { .. }), "{msg}");
    assert!(
        msg.contains("prefetch.minilm.runtime_library") && msg.contains("no-such-libonnxruntime"),
        "{msg}"
    );

    // A file that is not a shared library: dlopen fails (or, when this process loaded the
    // real one already, the second library is refused), an error either way.
    let not_a_library = MinilmConfig {
        runtime_library: Some(dir.join("tokenizer.json")),
        ..minilm_files_in(&dir)
    };
    let msg = MiniLm::load(&not_a_library, 1)
        .err()
        .expect("an error")
        .to_string();
    println!("not a library: {msg}");
    assert!(msg.contains("prefetch.minilm.runtime_library"), "{msg}");

    // The config refuses the missing library before anything loads.
    let msg = config("", &dir.join("no-such-libonnxruntime.so"))
        .expect_err("invalid config")
        .to_string();
    assert!(msg.contains("prefetch.minilm.runtime_library"), "{msg}");

    // And the real library still loads afterwards: a failed load leaves nothing behind.
    let m = load();
    assert!(sim(&m, "The cat sits on the mat", "A cat is sitting on a mat") > 0.85);
}
