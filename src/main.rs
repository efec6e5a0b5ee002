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
use iomt_edge::transport::credentials;
use iomt_edge::verify;

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
        /// mqtt://host:port, or mqtts://host:port for TLS.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        /// The account to log in with (needs --password-file).
        #[arg(long, requires = "password_file")]
        username: Option<String>,
        /// A file holding the password (mode 0600 or stricter; one line).
        #[arg(long, requires = "username")]
        password_file: Option<PathBuf>,
        /// PEM CA certificates the mqtts:// broker's certificate must chain to (default: the
        /// operating system's trust store).
        #[arg(long)]
        ca: Option<PathBuf>,
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
    /// Check a data directory: decrypt and re-hash every batch, rebuild the log of batches,
    /// check every checkpoint's signature and consistency and the ledger's anchors.
    ///
    /// Prints a report; exits 0 only when everything holds, 1 naming each failure otherwise.
    /// Run it with the service stopped (it takes the data directory's lock).
    Verify {
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// An Ethereum JSON-RPC endpoint: every anchor on an Ethereum chain is looked up there.
        #[arg(long)]
        rpc: Option<String>,
    },
    /// Write a self-contained proof that a reading existed, unchanged, to standard output
    /// (format: docs/proof-format.md). Run it with the service stopped; a running service
    /// answers `GET /proof/<seq>`.
    Proof {
        /// The reading's seq; or give --subject, --from and --to for a range.
        #[arg(required_unless_present = "subject", conflicts_with = "subject")]
        seq: Option<u64>,
        /// Prove every reading of this subject with a device time from --from to --to.
        #[arg(long, requires_all = ["from", "to"])]
        subject: Option<String>,
        /// RFC 3339 time, or seconds since the Unix epoch.
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        #[arg(long, value_parser = parse_time)]
        to: Option<i64>,
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
    /// Check a proof file with no access to the data directory: the checkpoint's signature, the
    /// batches' paths to it, the readings' paths to their batches.
    ///
    /// Exits 0 when it holds; otherwise 1, naming the step that failed.
    VerifyProof {
        file: PathBuf,
        /// The node's verifier key you trust (the string, or a file holding it). Without it the
        /// key the proof carries is used, and the output says so.
        #[arg(long)]
        key: Option<String>,
        /// An Ethereum JSON-RPC endpoint: the proof's anchor is looked up on that chain.
        #[arg(long)]
        rpc: Option<String>,
    },
    /// Ask a running service whether it is healthy: exit 0 only when `GET URL` answers 200.
    ///
    /// For a container's HEALTHCHECK (its runtime image has no curl) or a supervisor's probe.
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9100/healthz")]
        url: String,
        /// A PEM file of the CA certificates to trust for an https:// URL (default: the
        /// operating system's trust store).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// How long to wait for the whole answer.
        #[arg(long, default_value = "5s", value_parser = humantime_serde::re::humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// The chain the node anchors its checkpoints on.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Device and service accounts: a file of salted PBKDF2-HMAC-SHA512 password hashes in
    /// mosquitto's password-file format (it serves an external mosquitto's `password_file` too).
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Add an account, or give an existing one a new password (its entry is replaced).
    ///
    /// The password is never taken on the command line: it comes from --password-file, or is
    /// made with --generate (and printed once on standard output), or is read as one line from
    /// standard input.
    Add {
        name: String,
        /// The credentials file (mode 0600; created if missing).
        #[arg(long, default_value = DEFAULT_CREDENTIALS)]
        file: PathBuf,
        /// Read the password from this file (mode 0600 or stricter; one line).
        #[arg(long, conflicts_with = "generate")]
        password_file: Option<PathBuf>,
        /// Make a random password (32 characters) and print it on standard output.
        #[arg(long)]
        generate: bool,
        /// PBKDF2 iterations (OWASP's 210,000 for PBKDF2-HMAC-SHA512 by default).
        #[arg(long, default_value_t = credentials::DEFAULT_ITERATIONS,
              value_parser = clap::value_parser!(u32).range(1..))]
        iterations: u32,
    },
    /// Remove an account.
    Remove {
        name: String,
        #[arg(long, default_value = DEFAULT_CREDENTIALS)]
        file: PathBuf,
    },
    /// List the accounts and their iteration counts (never a hash).
    List {
        #[arg(long, default_value = DEFAULT_CREDENTIALS)]
        file: PathBuf,
    },
}

/// Where `iomt-edge credentials` keeps accounts unless told otherwise: next to the node's keys.
const DEFAULT_CREDENTIALS: &str = "data/credentials";

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

/// An RFC 3339 time or seconds since the Unix epoch, as µs since the epoch.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs
            .checked_mul(1_000_000)
            .ok_or_else(|| format!("{s}: out of range"));
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_micros())
        .map_err(|e| format!("{s}: not an RFC 3339 time nor seconds since the epoch ({e})"))
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
            username,
            password_file,
            ca,
            speed,
            looped,
        } => {
            let messages = replay::load_fixture(&file)?;
            let progress = std::io::stderr().is_terminal();
            let login = replay::BrokerLogin {
                username,
                password_file,
                ca,
            };
            let summary = replay::replay(
                &messages,
                &broker,
                &login,
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
        Command::Verify { data, rpc } => verify_command(&data, rpc.as_deref()).await,
        Command::Proof {
            seq,
            subject,
            from,
            to,
            data,
        } => proof_command(&data, seq, subject.as_deref().zip(from.zip(to))),
        Command::VerifyProof { file, key, rpc } => {
            verify_proof_command(&file, key.as_deref(), rpc.as_deref()).await
        }
        Command::Ledger {
            command: LedgerCommand::Deploy { rpc, data },
        } => ledger_deploy(&rpc, &data).await,
        Command::Credentials { command } => credentials_command(command),
        Command::Healthcheck { url, ca, timeout } => {
            healthcheck(&url, ca.as_deref(), timeout).await
        }
    }
}

fn credentials_command(command: CredentialsCommand) -> anyhow::Result<()> {
    match command {
        CredentialsCommand::Add {
            name,
            file,
            password_file,
            generate,
            iterations,
        } => {
            // The name first: a bad one must not cost a typed password.
            credentials::check_name(&name)
                .map_err(|m| anyhow::anyhow!("`{name}`: the account name {m}"))?;
            let password = if generate {
                credentials::generate_password()
            } else if let Some(p) = password_file {
                credentials::read_password_file(&p)?
            } else {
                read_password_line()?
            };
            let iterations =
                std::num::NonZeroU32::new(iterations).context("--iterations must be at least 1")?;
            let added = credentials::add(&file, &name, password.as_bytes(), iterations)?;
            if generate {
                println!("{password}");
            }
            match added {
                credentials::Added::New => say!("added `{name}` to {}", file.display()),
                credentials::Added::Replaced => say!(
                    "replaced `{name}`'s entry in {} (new password)",
                    file.display()
                ),
            }
            Ok(())
        }
        CredentialsCommand::Remove { name, file } => {
            credentials::remove(&file, &name)?;
            say!("removed `{name}` from {}", file.display());
            Ok(())
        }
        CredentialsCommand::List { file } => {
            let c = credentials::Credentials::load(&file)?;
            let mut out = std::io::stdout().lock();
            for name in c.names() {
                let n = c.iterations(name).unwrap_or_default();
                if n < credentials::DEFAULT_ITERATIONS {
                    writeln!(
                        out,
                        "{name}\t{n} iterations (below the default {}: add it again to strengthen it)",
                        credentials::DEFAULT_ITERATIONS
                    )?;
                } else {
                    writeln!(out, "{name}\t{n} iterations")?;
                }
            }
            Ok(())
        }
    }
}

/// One line of standard input: the password, without its line break. On a terminal the typing
/// is not echoed (ps never shows it, and neither does the screen).
fn read_password_line() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let _echo_off = if terminal {
        say!("password (one line, not echoed):");
        EchoOff::new()
    } else {
        None
    };
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    drop(_echo_off);
    if terminal {
        say!();
    }
    let password = line
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&line);
    if password.is_empty() {
        anyhow::bail!(
            "the password is empty: give one on standard input, or --password-file, or --generate"
        );
    }
    Ok(password.to_owned())
}

/// Terminal echo off on standard input while it lives (termios: no crate needed for one flag).
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Option<EchoOff> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios they fill / we copied.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings tcgetattr gave.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

/// Fails unless `data` holds a store directory: commands that read never create one.
fn existing_store_dir(data: &Path) -> anyhow::Result<PathBuf> {
    let store_dir = data.join("store");
    match std::fs::metadata(&store_dir) {
        Ok(meta) if meta.is_dir() => Ok(store_dir),
        Ok(_) => anyhow::bail!("{}: not a directory", store_dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "{}: no iomt-edge data here (no store/ directory)",
            data.display()
        ),
        Err(e) => Err(anyhow::Error::new(e).context(store_dir.display().to_string())),
    }
}

/// A progress bar on standard error when it is a terminal; nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl verify::Progress for Bar {
    fn start(&mut self, what: &str, total: u64) {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{msg:>12} {bar:40} {pos}/{len} ({eta})")
            {
                bar.set_style(style);
            }
            bar.set_message(what.to_owned());
            self.0 = Some(bar);
        }
    }

    fn advance(&mut self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

fn proof_command(
    data: &Path,
    seq: Option<u64>,
    range: Option<(&str, (i64, i64))>,
) -> anyhow::Result<()> {
    use iomt_edge::ledger::{db::LedgerDb, outbox::Outbox, proof::Prover};
    let store_dir = existing_store_dir(data)?;
    let _lock = DataDirLock::acquire(data)?;
    let store = SledStore::open_existing(&store_dir)?;
    // A store written before the log existed gets it now: a proof needs it.
    store.build_log()?;
    let keys = open_node_keys(&store, &data.join("keys"), "", KeyMode::ReadOnly)?;
    let outbox = LedgerDb::open_existing(&data.join("ledger"))?
        .map(|db| Outbox::new(std::sync::Arc::new(db)));
    let sealer = Sealer::new(keys.master);
    let verifier_key = keys.signer.verifier_key();
    let prover = Prover {
        store: &store,
        sealer: &sealer,
        verifier_key: &verifier_key,
        outbox: outbox.as_ref(),
    };
    let proof = match (seq, range) {
        (Some(seq), _) => prover.seq(seq)?,
        (None, Some((subject, (from, to)))) => prover.range(subject, from, to)?,
        (None, None) => anyhow::bail!("give a seq, or --subject with --from and --to"),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &proof)?;
    writeln!(out)?;
    Ok(())
}

async fn verify_proof_command(
    file: &Path,
    key: Option<&str>,
    rpc: Option<&str>,
) -> anyhow::Result<()> {
    use iomt_edge::ledger::proof::{self, ProofFile};
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let parsed: ProofFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a proof file", file.display()))?;
    let key = match key {
        Some(k) if Path::new(k).is_file() => Some(
            std::fs::read_to_string(k)
                .with_context(|| k.to_owned())?
                .trim()
                .to_owned(),
        ),
        Some(k) => Some(k.to_owned()),
        None => None,
    };
    let checked = proof::check(&parsed, key.as_deref())
        .with_context(|| format!("{}: the proof does not hold", file.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "OK: {} reading(s) in the log of {} at tree size {}",
        checked.readings, checked.checkpoint.origin, checked.checkpoint.size
    )?;
    if !checked.key_trusted {
        writeln!(
            out,
            "note: checked with the key the proof carries; pass --key with the node's key from its operator to trust it"
        )?;
    }
    match &checked.receipt {
        None => writeln!(
            out,
            "anchor: none yet (the checkpoint waits in the node's outbox)"
        )?,
        Some(r) => writeln!(out, "anchor: {}", serde_json::to_string(r)?)?,
    }
    if let Some(rpc) = rpc {
        let found = proof::check_anchor(&parsed, &checked, rpc)
            .await
            .with_context(|| format!("{}: the proof does not hold", file.display()))?;
        writeln!(out, "anchor found on the chain: {found}")?;
    }
    Ok(())
}

async fn verify_command(data: &Path, rpc: Option<&str>) -> anyhow::Result<()> {
    existing_store_dir(data)?;
    let _lock = DataDirLock::acquire(data)?;
    let mut report = verify::verify(data, &mut Bar(None))?;
    if let Some(rpc) = rpc {
        verify::check_on_chain(&mut report, rpc).await;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "batches: {} ({} readings) decrypted and re-hashed to their roots",
        report.batches, report.readings
    )?;
    writeln!(
        out,
        "checkpoints: {} checked (signature, root, consistency with the one before)",
        report.checkpoints
    )?;
    writeln!(
        out,
        "local chain: {} entries linked; {} anchors waiting in the outbox",
        report.chain_entries, report.anchors_pending
    )?;
    if !report.on_chain.is_empty() {
        match rpc {
            Some(_) => writeln!(
                out,
                "ethereum: {} of {} anchors found on the chain",
                report.on_chain_found,
                report.on_chain.len()
            )?,
            None => writeln!(
                out,
                "ethereum: {} anchors not looked up (give --rpc to check them on the chain)",
                report.on_chain.len()
            )?,
        }
    }
    for f in &report.failures {
        writeln!(out, "FAIL {f}")?;
    }
    if report.ok() {
        writeln!(out, "OK: everything holds")?;
        Ok(())
    } else {
        anyhow::bail!("verify found {} problem(s)", report.failures.len())
    }
}

/// `ledger deploy`: the address alone on the first line, for scripts; then the lines to paste.
/// `GET url`; Ok only for a 200. Any other status is an error carrying the body (/healthz
/// names its phase and problems, never a reading), so the container's health log says why.
async fn healthcheck(
    url: &str,
    ca: Option<&Path>,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).with_context(|| format!("--url {url}"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "http" | "https"),
        "--url {url}: only http:// and https:// are supported"
    );
    // rustls on ring, as everywhere in this crate; built even for http://, where it is unused,
    // because reqwest without a default provider needs one.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS")?;
    let tls = match ca {
        Some(path) => {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("--ca {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("--ca {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("--ca {}", path.display()))?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "--ca {}: no certificate in it",
                path.display()
            );
            builder.with_root_certificates(roots)
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder.with_platform_verifier().context("TLS")?
        }
    }
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .build()
        .context("HTTP client")?;
    let response = client
        .get(parsed)
        .send()
        .await
        .with_context(|| format!("{url}: no answer"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status == reqwest::StatusCode::OK,
        "{url} answered {status}: {}",
        body.trim()
    );
    Ok(())
}

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
    let store_dir = existing_store_dir(data)?;
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
    let batch = sealer
        .open(sealed)
        .with_context(|| format!("batch {id}"))?
        .batch;
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
