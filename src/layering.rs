//! The module layering, checked: which top-level module of src/ may name which (`crate::x`
//! outside test modules), that these rules form no cycle, and that no source file outgrows
//! one job. docs/ARCHITECTURE.md's module map says the same in prose; change both together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules and what each may depend on. `app` is the composition root.
const ALLOWED: &[(&str, &[&str])] = &[
    ("alloc", &[]),
    ("auth", &[]),
    ("protocol", &[]),
    ("telemetry", &[]),
    ("tls", &[]),
    ("http", &["tls"]),
    ("config", &["auth", "protocol"]),
    ("store", &["config"]),
    ("security", &["auth", "config", "store"]),
    ("prefetch", &["config", "protocol", "telemetry"]),
    (
        "upstream",
        &["auth", "config", "http", "protocol", "telemetry", "tls"],
    ),
    (
        "shards",
        &["config", "protocol", "store", "telemetry", "upstream"],
    ),
    (
        "proxy",
        &[
            "auth",
            "config",
            "prefetch",
            "protocol",
            "shards",
            "telemetry",
            "tls",
            "upstream",
        ],
    ),
    (
        "admin",
        &[
            "alloc", "auth", "config", "http", "prefetch", "shards", "tls", "upstream",
        ],
    ),
    (
        "app",
        &[
            "admin",
            "auth",
            "config",
            "http",
            "prefetch",
            "proxy",
            "security",
            "shards",
            "store",
            "telemetry",
            "tls",
            "upstream",
        ],
    ),
];

/// Lines a source file may have before it should be split by job.
const MAX_LINES: usize = 700;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file without its trailing `#[cfg(test)] mod tests` (tests may reach anywhere).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Top-level modules named as `crate::x` or inside `crate::{x, y::z}`.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect()
}

#[test]
fn the_allowed_dependencies_form_no_cycle() {
    let rules = allowed();
    // Kahn's algorithm: repeatedly remove modules whose dependencies are all removed.
    let mut left: BTreeMap<&str, BTreeSet<&str>> = rules.clone();
    while !left.is_empty() {
        let ready: Vec<&str> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| *m)
            .collect();
        assert!(
            !ready.is_empty(),
            "dependency rules form a cycle among {:?}",
            left.keys()
        );
        for m in ready {
            left.remove(m);
        }
    }
    for deps in rules.values() {
        for d in deps {
            assert!(rules.contains_key(d), "rule names unknown module {d}");
        }
    }
}

#[test]
fn top_level_modules_depend_only_as_the_layering_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules = allowed();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let module = top_module(&src, file);
        if module == "main" || module == "lib" || module == "layering" {
            continue;
        }
        let Some(deps) = rules.get(module.as_str()) else {
            violations.push(format!(
                "{module} ({}) has no layering rule",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for r in references(without_tests(&text)) {
            if r != module && rules.contains_key(r.as_str()) && !deps.contains(r.as_str()) {
                violations.push(format!("{} uses crate::{r}", file.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn no_source_file_outgrows_one_job() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).ok()?.lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these by job: {long:?}");
}

#[test]
fn references_are_read_from_paths_and_groups() {
    let r = references("use crate::{config::X, shards};\nlet a = crate::proxy::Ctx::new();");
    assert_eq!(
        r.into_iter().collect::<Vec<_>>(),
        vec!["config", "proxy", "shards"]
    );
}
