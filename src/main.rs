use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardgate::config::Config;

#[global_allocator]
static ALLOC: shardgate::alloc::GuardedAlloc = shardgate::alloc::GuardedAlloc;

#[derive(Parser)]
#[command(
    name = "shardgate",
    version,
    about = "Kafka wire-protocol proxy with elastic shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short, default_value = "shardgate.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        #[arg(long, short, default_value = "shardgate.toml")]
        config: PathBuf,
    },
    /// Inspect and change shard maps through a running instance's admin API.
    Shards {
        /// Admin address of a shardgate instance.
        #[arg(long, default_value = "http://127.0.0.1:29100", global = true)]
        admin: String,
        /// Environment variable holding the admin token to present (when the instance has
        /// [[admin.tokens]]); the token itself is never a command-line argument.
        #[arg(long, default_value = "SHARDGATE_ADMIN_TOKEN", global = true)]
        token_env: String,
        /// PEM file with the CA that signed the admin API's certificate (an https:// --admin).
        #[arg(long, global = true)]
        ca: Option<PathBuf>,
        #[command(subcommand)]
        op: ShardsOp,
    },
    /// Print a credentials-file entry for USER (listener.sasl.credentials): the password,
    /// read from the first line of standard input, in SCRAM's salted form only.
    Credentials {
        user: String,
        /// SCRAM-SHA-256, SCRAM-SHA-512 or both (PLAIN is checked against either).
        #[arg(long, default_value = "both")]
        mechanism: String,
        #[arg(long, default_value_t = 8192)]
        iterations: u32,
    },
}

#[derive(Subcommand)]
enum ShardsOp {
    /// List managed topics, or the shard map of one topic.
    List { topic: Option<String> },
    /// Split a shard (at the weighted median of observed keys unless --at is given).
    Split {
        topic: String,
        shard: u32,
        #[arg(long)]
        at: Option<String>,
    },
    /// Merge two adjacent shards.
    Merge { topic: String, a: u32, b: u32 },
    /// Shards and load per broker, and the replica moves under way.
    Placement { topic: String },
    /// Move a pool partition's replicas to BROKERS (new leader first, as many as it has).
    Move {
        topic: String,
        partition: i32,
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<i32>,
    },
    /// Cancel a replica move under way.
    CancelMove { topic: String, partition: i32 },
}

fn main() -> ExitCode {
    shardgate::proxy::server::tune_allocator();
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Run { config } | Command::CheckConfig { config } => config,
        Command::Shards {
            admin,
            token_env,
            ca,
            op,
        } => {
            return shards_cli(
                admin,
                std::env::var(token_env).ok().as_deref(),
                ca.as_deref(),
                op,
            );
        }
        Command::Credentials {
            user,
            mechanism,
            iterations,
        } => return credentials_cli(user, mechanism, *iterations),
    };
    let settings = match Config::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shardgate: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(settings.raw.log.format);
    if matches!(cli.command, Command::CheckConfig { .. }) {
        println!("{}: ok", config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shardgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let running = match shardgate::app::start(settings).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("shardgate: {e}");
                return ExitCode::from(2);
            }
        };
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.stop().await;
        ExitCode::SUCCESS
    })
}

/// Log lines to stderr, filtered by `SHARDGATE_LOG` (default `info`), as text or JSON
/// (`[log] format`).
fn init_logs(format: shardgate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        shardgate::config::LogFormat::Text => logs.init(),
        shardgate::config::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn credentials_cli(user: &str, mechanism: &str, iterations: u32) -> ExitCode {
    use shardgate::auth::scram::{Hash, MIN_ITERATIONS};
    let hashes = match mechanism {
        "both" => vec![Hash::Sha256, Hash::Sha512],
        "SCRAM-SHA-256" => vec![Hash::Sha256],
        "SCRAM-SHA-512" => vec![Hash::Sha512],
        other => {
            eprintln!(
                "shardgate credentials: --mechanism {other:?}: use SCRAM-SHA-256, SCRAM-SHA-512 or both"
            );
            return ExitCode::from(2);
        }
    };
    if iterations < MIN_ITERATIONS {
        eprintln!("shardgate credentials: --iterations {iterations}: at least {MIN_ITERATIONS}");
        return ExitCode::from(2);
    }
    let mut password = String::new();
    if std::io::stdin().read_line(&mut password).is_err() || password.trim_end().is_empty() {
        eprintln!("shardgate credentials: give the password on the first line of standard input");
        return ExitCode::from(2);
    }
    let password = password.trim_end_matches(['\r', '\n']);
    print!(
        "{}",
        shardgate::auth::credentials::entry(user, password, &hashes, iterations)
    );
    ExitCode::SUCCESS
}

fn shards_cli(
    admin: &str,
    token: Option<&str>,
    ca: Option<&std::path::Path>,
    op: &ShardsOp,
) -> ExitCode {
    let trust = match ca.map(|ca| shardgate::http::Trust::from_pem("--ca", ca)) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("shardgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (method, path, body) = match op {
        ShardsOp::List { topic: None } => ("GET", "/api/v1/topics".to_string(), None),
        ShardsOp::List { topic: Some(t) } => ("GET", format!("/api/v1/topics/{t}/shards"), None),
        ShardsOp::Split { topic, shard, at } => (
            "POST",
            format!("/api/v1/topics/{topic}/shards/{shard}/split"),
            Some(match at {
                Some(a) => serde_json::json!({ "at": a }).to_string(),
                None => "{}".to_string(),
            }),
        ),
        ShardsOp::Merge { topic, a, b } => (
            "POST",
            format!("/api/v1/topics/{topic}/merge"),
            Some(serde_json::json!({ "shards": [a, b] }).to_string()),
        ),
        ShardsOp::Placement { topic } => ("GET", format!("/api/v1/topics/{topic}/placement"), None),
        ShardsOp::Move {
            topic,
            partition,
            to,
        } => (
            "POST",
            format!("/api/v1/topics/{topic}/placement/moves"),
            Some(serde_json::json!({ "partition": partition, "to": to }).to_string()),
        ),
        ShardsOp::CancelMove { topic, partition } => (
            "DELETE",
            format!("/api/v1/topics/{topic}/placement/moves/{partition}"),
            None,
        ),
    };
    match shardgate::admin::http_request_tls(
        admin,
        method,
        &path,
        body.as_deref(),
        token,
        trust.as_ref(),
    ) {
        Ok((status, text)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&text)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(text);
            println!("{pretty}");
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("shardgate: admin API answered {status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("shardgate: cannot reach the admin API at {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
