//! Tests of the top-level config; submodules append their sections to `MINIMAL`.

use super::*;

pub(super) fn parse(text: &str) -> Result<Settings, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

/// The smallest valid config (the section tests of submodules append theirs).
pub(super) const MINIMAL: &str = r#"
[listener]
bind = "127.0.0.1:29092"
[upstream]
bootstrap = ["127.0.0.1:19092"]
"#;

#[test]
fn minimal_config_gets_defaults_and_a_single_instance() {
    let s = parse(MINIMAL).unwrap();
    assert_eq!(s.advertised.to_string(), "127.0.0.1:29092");
    assert_eq!(s.instances.len(), 1);
    assert_eq!(s.raw.limits.max_frame_bytes, 100 * 1024 * 1024);
    assert_eq!(s.admin_bind.to_string(), "127.0.0.1:29100");
}

#[test]
fn bad_values_name_the_key() {
    let e = parse(&MINIMAL.replace("19092\"]", "19092\"]\nconnections_per_broker = 0"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstream.connections_per_broker"), "{e}");
    let e = parse(&MINIMAL.replace("127.0.0.1:19092", "nohost"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstream.bootstrap[0]"), "{e}");
    let e = parse(&MINIMAL.replace("bind = \"127.0.0.1:29092\"", "bind = \"x\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener.bind"), "{e}");
}

#[test]
fn unknown_keys_and_garbage_are_rejected() {
    assert!(parse(&format!("{MINIMAL}\n[bogus]\nx=1")).is_err());
    assert!(parse("this is not toml [[").is_err());
    assert!(parse("").is_err());
}

#[test]
fn log_format_is_text_or_json() {
    assert_eq!(parse(MINIMAL).unwrap().raw.log.format, LogFormat::Text);
    let json = parse(&format!("{MINIMAL}\n[log]\nformat = \"json\"")).unwrap();
    assert_eq!(json.raw.log.format, LogFormat::Json);
    let e = parse(&format!("{MINIMAL}\n[log]\nformat = \"xml\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("log.format") || e.contains("format"), "{e}");
    assert!(e.contains("json"), "the error names the choices: {e}");
}

#[test]
fn wildcard_bind_needs_advertised() {
    let e = parse(&MINIMAL.replace("127.0.0.1:29092", "0.0.0.0:29092"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener.advertised"), "{e}");
}
