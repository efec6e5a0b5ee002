//! anvil (npm `@foundry-rs/anvil-linux-amd64`, installed by scripts/test.sh, found through
//! IOMT_ANVIL or PATH) on a free loopback port, and a JSON-RPC client written by hand over a
//! plain TCP socket: what the service wrote on the chain is read back without its own client.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iomt_edge::ledger::Submission;
use serde_json::{json, Value};

/// anvil's first development account (unlocked on anvil; its key is public knowledge): it funds
/// the node's account.
pub const DEV_ACCOUNT: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";
pub const ANVIL_CHAIN_ID: u64 = 31337;

/// A tool the test suite installs: its path from `env` (set by scripts/test.sh), else PATH.
pub fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={}: no such file", p.display());
        return p;
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: {env} is not set and {name} is not on PATH. Run the tests \
                 with scripts/test.sh, which installs it from npm and sets {env}"
            )
        })
}

/// An anvil process on 127.0.0.1, killed when dropped.
pub struct Anvil {
    pub child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Anvil {
    pub fn start() -> Anvil {
        Anvil::start_on(super::free_port())
    }

    pub fn start_on(port: u16) -> Anvil {
        Anvil::start_on_with(port, &[])
    }

    /// anvil with more command-line options (`--block-time 1`).
    pub fn start_with(args: &[&str]) -> Anvil {
        Anvil::start_on_with(super::free_port(), args)
    }

    pub fn start_on_with(port: u16, args: &[&str]) -> Anvil {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("anvil.log");
        let child = Command::new(tool("IOMT_ANVIL", "anvil"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .expect("starting anvil");
        let mut anvil = Anvil {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = anvil.child.try_wait() {
                panic!(
                    "anvil exited ({status}) before answering:\n{}",
                    std::fs::read_to_string(&anvil.log).unwrap_or_default()
                );
            }
            if try_rpc(port, "eth_chainId", json!([])).is_ok() {
                return anvil;
            }
            assert!(Instant::now() < deadline, "anvil did not answer on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn rpc(&self, method: &str, params: Value) -> Value {
        try_rpc(self.port, method, params).unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    pub fn block_number(&self) -> u64 {
        quantity(&self.rpc("eth_blockNumber", json!([])))
    }

    pub fn mine(&self, blocks: u64) {
        self.rpc("anvil_mine", json!([format!("{blocks:#x}")]));
    }

    pub fn automine(&self, on: bool) {
        self.rpc("evm_setAutomine", json!([on]));
    }

    /// Sends 10 ether from the development account to `to`.
    pub fn fund(&self, to: &str) {
        let hash = self.rpc(
            "eth_sendTransaction",
            json!([{"from": DEV_ACCOUNT, "to": to, "value": "0x8ac7230489e80000"}]),
        );
        assert_eq!(self.receipt(&hash)["status"], "0x1", "funding {to}");
    }

    /// The receipt of `hash`, once mined: anvil answers eth_sendTransaction before it mines.
    pub fn receipt(&self, hash: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let receipt = self.rpc("eth_getTransactionReceipt", json!([hash]));
            if !receipt.is_null() {
                return receipt;
            }
            assert!(Instant::now() < deadline, "{hash} not mined");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until anvil's automining has mined `sub`.
    pub fn mined(&self, sub: &Submission) {
        self.receipt(&json!(sub.reference));
    }

    /// keccak-256 of `text`, computed by the chain (web3_sha3), not by this crate.
    pub fn keccak(&self, text: &str) -> String {
        let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
        self.rpc("web3_sha3", json!([format!("0x{hex}")]))
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One JSON-RPC call over HTTP/1.1, written by hand: the `result`, or the `error` object (or
/// the I/O failure) as text.
pub fn try_rpc(port: u16, method: &str, params: Value) -> Result<Value, String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8(raw).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let reply: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body:?}"))?;
    match reply.get("error") {
        Some(e) => Err(e.to_string()),
        None => Ok(reply["result"].clone()),
    }
}

pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

pub fn quantity(v: &Value) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a quantity: {v}"));
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}
