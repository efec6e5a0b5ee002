//! The `iomt-edge` command line.

use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::info;
use tracing_subscriber::EnvFilter;

use iomt_edge::config::{CodecName, PipelineConfig};
use iomt_edge::decode::{self, DecodeCommandError, DecodeRequest, InputEncoding};
use iomt_edge::model::batch::BatchView;
use iomt_edge::replay::{self, Speed};
use iomt_edge::seal::{SealedBatch, Sealer};
use iomt_edge::service::Service;
use iomt_edge::store::{open_node_keys, DataDirLock, KeyMode, SledStore, Store};

#[derive(Parser)]
#[command(
    name = "iomt-edge",
    version,
    about = "Edge service for the Internet of Medical Things"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: embedded broker (or external), ingest, alarms, sealed storage, HTTP.
    Run {
        /// Pipeline file (default: the embedded pipelines/ward.toml).
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Data directory: store, keys, endpoints.json.
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
    /// Publish a recorded fixture to a broker with its original timing (fixtures/README.md).
    Replay {
        file: PathBuf,
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        /// Timing factor (2 = twice as fast), or `max`.
        #[arg(long, default_value = "1")]
        speed: Speed,
        /// Start over after the last message, until interrupted.
        #[arg(long = "loop")]
        looped: bool,
    },
    /// Decode one payload from standard input and print its canonical readings as JSON lines.
    ///
    /// Exit status 2, with the reason on standard error, when the payload is invalid.
    Decode {
        /// The device format, as a pipeline route names it.
        #[arg(long, value_enum)]
        codec: CodecName,
        /// The topic the payload would arrive on (fills the route's source/subject templates).
        #[arg(long)]
        topic: Option<String>,
        /// Standard input holds the payload as hex (for binary formats: BLE, SenML CBOR).
        #[arg(long, conflicts_with = "base64")]
        hex: bool,
        /// Standard input holds the payload as base64.
        #[arg(long)]
        base64: bool,
        /// A pipeline file whose route gives the codec its options (mappings, columns, …).
        #[arg(long, requires = "route")]
        pipeline: Option<PathBuf>,
        /// The index of that route in the file, from 0.
        #[arg(long, requires = "pipeline")]
        route: Option<usize>,
    },
    /// Print the stored readings as JSON lines (the service must be stopped: one process per
    /// data directory).
    ///
    /// Batch by batch, in order: the first batch that cannot be read or opened ends the dump
    /// with an error naming it, exit status 1, after the readings of every batch before it.
    /// Creates nothing: a data directory without a store, or a missing key, is an error.
    Dump {
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// The site of the pipeline that wrote the data (names the node key).
        #[arg(long, default_value = "ward")]
        site: String,
    },
    /// The chain the node anchors its checkpoints on.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Deploy the anchor contract (contracts/IomtAnchor.sol) on an Ethereum JSON-RPC chain and
    /// print its address and the pipeline file's `[ledger.ethereum]` lines.
    ///
    /// Pays with the node's ethereum key, `<data>/keys/ethereum.key`, created if there is none:
    /// its address is printed when it has no ether to pay with.
    Deploy {
        /// The chain's JSON-RPC endpoint (http:// or https://).
        #[arg(long)]
        rpc: String,
        /// Data directory: the node's keys are in its keys/.
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
}

/// Writes a line to standard error. Unlike `eprintln!`, it does not panic when standard error
/// cannot be written (a full disk under the log file): the exit status still tells.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// rumqttd logs ordinary client disconnects at ERROR: its own log is opt-in (src/broker.rs).
const DEFAULT_LOG: &str = "info,rumqttd=off,sled=warn";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        // A log that cannot be written (its disk full) must not take the service down:
        // tracing-subscriber's own complaint about it would panic writing to that same stderr.
        .log_internal_errors(false)
        // Colour codes are noise in a log file or a journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    install_panic_hook();
    let cli = Cli::parse();
    if let Command::Decode {
        codec,
        topic,
        hex,
        base64,
        pipeline,
        route,
    } = &cli.command
    {
        let input = if *hex {
            InputEncoding::Hex
        } else if *base64 {
            InputEncoding::Base64
        } else {
            InputEncoding::Raw
        };
        let req = DecodeRequest {
            codec: *codec,
            topic: topic.as_deref(),
            input,
            route: pipeline.as_deref().zip(*route),
        };
        return decode_command(&req);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(feature = "failpoints")]
    let _faults = fail::FailScenario::setup();
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    };
    // A stage that could not be stopped in time may still hold a thread: the stop already
    // decided, so do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// An error and its causes on one line, each said once. Errors of this crate that name their
/// cause in their own message (`"{file}: {source}"`) also expose it as their source, so printing
/// the whole chain would repeat it: a cause whose text is already there is left out.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { pipeline, data } => {
            let config = PipelineConfig::load_or_default(pipeline.as_ref())?;
            // Installed before anything starts: a signal during the start is taken as a stop,
            // not as the default action (an immediate exit).
            let mut signals = Signals::install()?;
            let service = Service::start(config, &data).await?;
            let stop = service.shutdown_handle();
            tokio::spawn(async move {
                signals.next().await;
                info!("signal received: stopping (a second signal exits at once)");
                stop.send_replace(true);
                signals.next().await;
                say!("error: second signal: exiting without waiting for the stop");
                std::process::exit(1);
            });
            let summary = service.wait().await?;
            info!(
                batches = summary.batches,
                readings = summary.readings,
                messages = summary.messages,
                next_seq = summary.next_seq,
                "stopped cleanly"
            );
            Ok(())
        }
        Command::Replay {
            file,
            broker,
            speed,
            looped,
        } => {
            let messages = replay::load_fixture(&file)?;
            let progress = std::io::stderr().is_terminal();
            let summary = replay::replay(
                &messages,
                &broker,
                speed,
                looped,
                progress,
                wait_for_signal(),
            )
            .await?;
            println!("{summary}");
            Ok(())
        }
        Command::Decode { .. } => unreachable!("handled before the runtime starts"),
        Command::Dump { data, site } => dump(&data, &site),
        Command::Ledger {
            command: LedgerCommand::Deploy { rpc, data },
        } => ledger_deploy(&rpc, &data).await,
    }
}

/// `ledger deploy`: the address alone on the first line, for scripts; then the lines to paste.
async fn ledger_deploy(rpc: &str, data: &Path) -> anyhow::Result<()> {
    let contract = iomt_edge::ledger::ethereum::deploy(rpc, &data.join("keys")).await?;
    let rpc = toml::Value::String(rpc.to_owned());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{contract}\n\n# For the pipeline file:\n[ledger.ethereum]\nrpc = {rpc}\ncontract = \"{contract}\""
    )
    .context("standard output")
}

/// `dump`: streams the readings of each batch as it is read, so that a batch that does not open
/// ends the dump with an error naming it after every batch before it has been printed. Creates
/// nothing but the data directory's LOCK file: no store (checked before sled would make one),
/// no keys.
fn dump(data: &Path, site: &str) -> anyhow::Result<()> {
    let store_dir = data.join("store");
    match std::fs::metadata(&store_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => anyhow::bail!("{}: not a directory", store_dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "{}: no iomt-edge data here (no store/ directory)",
            data.display()
        ),
        Err(e) => return Err(anyhow::Error::new(e).context(store_dir.display().to_string())),
    }
    let _lock = DataDirLock::acquire(data)?;
    let store = SledStore::open_existing(&store_dir)?;
    let keys = open_node_keys(
        &store,
        &data.join("keys"),
        &format!("iomt-edge/{site}"),
        KeyMode::ReadOnly,
    )?;
    let sealer = Sealer::new(keys.master);
    let mut out = std::io::stdout().lock();
    let mut failure = None;
    store.scan(
        &mut |sealed| match print_batch(&mut out, &sealer, &sealed) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    failure.map_or(Ok(()), Err)
}

/// One JSON line per reading of `sealed`.
fn print_batch(out: &mut impl Write, sealer: &Sealer, sealed: &SealedBatch) -> anyhow::Result<()> {
    let id = sealed.header.id;
    let batch = sealer.open(sealed).with_context(|| format!("batch {id}"))?;
    let readings = BatchView::new(&batch)
        .and_then(|v| v.readings())
        .with_context(|| format!("batch {id}"))?;
    for r in readings {
        let mut line = serde_json::to_value(r.canonical_json())?;
        line["seq"] = r.seq.into();
        line["batch"] = id.into();
        writeln!(out, "{line}").context("standard output")?;
    }
    Ok(())
}

fn decode_command(req: &DecodeRequest<'_>) -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        say!("error: reading standard input: {e}");
        return ExitCode::FAILURE;
    }
    match decode::decode(req, &input) {
        Ok(readings) => {
            let mut out = std::io::stdout().lock();
            for r in &readings {
                let line = serde_json::to_string(&r.canonical_json()).expect("plain JSON");
                if writeln!(out, "{line}").is_err() {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(DecodeCommandError::Payload(e)) => {
            say!("invalid payload: {e}");
            ExitCode::from(2)
        }
        Err(e @ DecodeCommandError::Setup(_)) => {
            say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn wait_for_signal() {
    match Signals::install() {
        Ok(mut s) => s.next().await,
        Err(_) => std::future::pending().await,
    }
}

/// A panic's message may quote data (rumqttd's, a topic): it is logged at debug level only; the
/// thread and the place are logged as an error.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread,
            location,
            "a thread panicked (its message is logged at debug level)"
        );
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::debug!(thread, message, "panic message");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use iomt_edge::config::ConfigError;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let missing = ConfigError::Read {
            file: "nonexist.toml".into(),
            source: std::io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            error_chain(&missing.into()),
            "nonexist.toml: No such file or directory (os error 2)"
        );
        // Context that does not name its cause keeps it.
        let e =
            anyhow::Error::from(std::io::Error::from_raw_os_error(13)).context("opening the store");
        assert_eq!(
            error_chain(&e),
            "opening the store: Permission denied (os error 13)"
        );
        let e = anyhow::anyhow!("root cause")
            .context("middle")
            .context("outer names the middle: middle");
        assert_eq!(
            error_chain(&e),
            "outer names the middle: middle: root cause"
        );
    }
}
