//! The `ethereum` ledger backend against a real chain: anvil (npm `@foundry-rs/anvil-linux-amd64`,
//! installed by scripts/test.sh, found through IOMT_ANVIL or PATH) on a free loopback port.
//!
//! What the service wrote is read back with a JSON-RPC client written here over a plain TCP
//! socket, not with the service's own client: a verifier must not need this crate.

mod common;

use common::anvil::*;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iomt_edge::ledger::ethereum::{self, load_or_create_key, EthereumLedger, EthereumOptions};
use iomt_edge::ledger::{Anchor, AnchorStatus, Ledger, LedgerError, Receipt, Submission};
use iomt_edge::seal::checkpoint::{Checkpoint, NoteSigner};
use serde_json::{json, Value};

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A signed checkpoint of a log of `size` batches with root `root`.
fn anchor(origin: &str, size: u64, root: [u8; 32]) -> Anchor {
    let checkpoint = Checkpoint {
        origin: origin.to_owned(),
        size,
        root,
    };
    let signer = NoteSigner::from_seed(origin, &[7u8; 32]).unwrap();
    let note = signer.sign(&checkpoint.to_text()).unwrap();
    Anchor { checkpoint, note }
}

/// A chain with the anchor contract deployed by the node's funded key, and the node's keys.
struct Chain {
    anvil: Anvil,
    keys: tempfile::TempDir,
    contract: String,
}

impl Chain {
    async fn start() -> Chain {
        let anvil = Anvil::start();
        let keys = tempfile::tempdir().unwrap();
        let contract = fund_and_deploy(&anvil, keys.path()).await;
        Chain {
            anvil,
            keys,
            contract,
        }
    }

    fn options(&self, confirmations: u64) -> EthereumOptions {
        EthereumOptions {
            confirmations,
            chain_id: Some(ANVIL_CHAIN_ID),
            timeout: Duration::from_secs(5),
            ..EthereumOptions::new(
                self.anvil.url().parse().unwrap(),
                self.contract.parse().unwrap(),
            )
        }
    }

    fn ledger(&self, confirmations: u64) -> EthereumLedger {
        self.options(confirmations).build(self.keys.path()).unwrap()
    }
}

async fn fund_and_deploy(anvil: &Anvil, keys: &Path) -> String {
    let node = load_or_create_key(keys).unwrap().address();
    anvil.fund(&node.to_string());
    ethereum::deploy(&anvil.url(), keys)
        .await
        .unwrap()
        .to_string()
}

async fn status(ledger: &EthereumLedger, a: &Anchor, s: &Submission) -> AnchorStatus {
    ledger.status(a, s).await.unwrap()
}

fn confirmed(status: AnchorStatus) -> Receipt {
    match status {
        AnchorStatus::Confirmed(r) => r,
        other => panic!("not confirmed: {other:?}"),
    }
}

#[test]
fn deploy_command_asks_for_funds_then_prints_the_contract_address() {
    let anvil = Anvil::start();
    let data = tempfile::tempdir().unwrap();
    let deploy = || {
        Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
            .args(["ledger", "deploy", "--rpc", &anvil.url(), "--data"])
            .arg(data.path())
            .output()
            .unwrap()
    };

    let unfunded = deploy();
    let stderr = String::from_utf8_lossy(&unfunded.stderr);
    assert!(
        !unfunded.status.success(),
        "deployed without funds: {stderr}"
    );
    let key_path = data.path().join("keys/ethereum.key");
    let key = std::fs::read_to_string(&key_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is owner-only");
    let address = load_or_create_key(&data.path().join("keys"))
        .unwrap()
        .address()
        .to_string();
    assert!(
        stderr.contains(&address) && stderr.contains("no ether on chain 31337"),
        "the error names the account to fund and the chain: {stderr}"
    );
    assert!(
        !stderr.contains(key.trim()),
        "the key is never printed: {stderr}"
    );

    anvil.fund(&address);
    let out = deploy();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy failed: {stderr}");
    assert!(!stderr.contains(key.trim()) && !stdout.contains(key.trim()));
    let contract = stdout.lines().next().unwrap().trim();
    assert!(
        contract.starts_with("0x") && contract.len() == 42,
        "the first line is the address: {stdout}"
    );
    assert!(
        stdout.contains("[ledger.ethereum]")
            && stdout.contains(&format!("rpc = \"{}\"", anvil.url()))
            && stdout.contains(&format!("contract = \"{contract}\"")),
        "the lines for the pipeline file: {stdout}"
    );
    // The chain holds the artefact's runtime code there: the deployment came from the node.
    let code = anvil.rpc("eth_getCode", json!([contract, "latest"]));
    let code = code.as_str().unwrap();
    assert!(code.len() > 100, "no contract at {contract}: {code}");
    let artefact: Value =
        serde_json::from_str(include_str!("../contracts/IomtAnchor.json")).unwrap();
    let creation = artefact["bytecode"].as_str().unwrap();
    assert!(
        creation.contains(&code[2..]),
        "the deployed code is the artefact's runtime code"
    );
    let deployer = anvil.rpc("eth_getTransactionCount", json!([address, "latest"]));
    assert_eq!(
        quantity(&deployer),
        1,
        "the node's account sent the deployment"
    );
}

#[tokio::test]
async fn an_anchor_is_pending_until_deep_enough_then_confirmed_and_anyone_can_read_it() {
    let chain = Chain::start().await;
    let anvil = &chain.anvil;
    let ledger = chain.ledger(3);
    assert_eq!(ledger.name(), "ethereum");
    let a = anchor("iomt-edge/test-ward", 42, [0xab; 32]);

    anvil.automine(false);
    let sub = ledger.submit(&a).await.unwrap();
    assert_eq!(
        status(&ledger, &a, &sub).await,
        AnchorStatus::Pending { confirmations: 0 },
        "in the pool, not mined"
    );
    anvil.mine(1);
    assert_eq!(
        status(&ledger, &a, &sub).await,
        AnchorStatus::Pending { confirmations: 1 }
    );
    anvil.mine(1);
    assert_eq!(
        status(&ledger, &a, &sub).await,
        AnchorStatus::Pending { confirmations: 2 }
    );
    anvil.mine(1);
    let receipt = confirmed(status(&ledger, &a, &sub).await);

    // The receipt names what the chain itself says about the transaction.
    let raw = anvil.rpc("eth_getTransactionReceipt", json!([sub.reference]));
    let Receipt::Ethereum {
        chain_id,
        contract,
        tx_hash,
        block_number,
        block_hash,
        log_index,
    } = &receipt
    else {
        panic!("not an ethereum receipt: {receipt:?}")
    };
    assert_eq!(*chain_id, ANVIL_CHAIN_ID);
    assert_eq!(*contract, chain.contract, "EIP-55 checksummed");
    assert_eq!(*tx_hash, sub.reference);
    assert_eq!(*block_number, quantity(&raw["blockNumber"]));
    assert_eq!(*block_hash, raw["blockHash"].as_str().unwrap());
    assert_eq!(*log_index, quantity(&raw["logs"][0]["logIndex"]));
    assert_eq!(raw["to"].as_str().unwrap(), chain.contract.to_lowercase());
    let gas = quantity(&raw["gasUsed"]);
    println!("gas used by one anchor call: {gas}");
    assert!(gas > 21_000 && gas < 40_000, "gas used: {gas}");

    // A third party finds it by root with eth_getLogs alone, and decodes it by hand.
    let topic0 = anvil.keccak("Anchored(bytes32,uint64,bytes32,address)");
    let root = format!("0x{}", "ab".repeat(32));
    let logs = anvil.rpc(
        "eth_getLogs",
        json!([{"address": chain.contract, "fromBlock": "0x0", "toBlock": "latest",
                "topics": [topic0, root]}]),
    );
    let logs = logs.as_array().unwrap();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let log = &logs[0];
    let topics: Vec<&str> = log["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(topics[0], topic0);
    assert_eq!(topics[1], root);
    assert_eq!(
        topics[2],
        format!("0x{}", sha256_hex(b"iomt-edge/test-ward")),
        "originHash = SHA-256 of the origin line"
    );
    let node = ledger.address().to_string().to_lowercase();
    assert_eq!(topics[3], format!("0x{:0>64}", &node[2..]), "submitter");
    let data = log["data"].as_str().unwrap();
    assert_eq!(
        data,
        format!("0x{:064x}", 42),
        "treeSize, the one unindexed field"
    );
    assert_eq!(log["transactionHash"].as_str().unwrap(), sub.reference);
    assert_eq!(quantity(&log["blockNumber"]), *block_number);
}

#[tokio::test]
async fn a_reorg_that_drops_the_anchor_sends_it_back_and_it_is_anchored_again() {
    let chain = Chain::start().await;
    let anvil = &chain.anvil;
    let ledger = chain.ledger(2);
    let a = anchor("iomt-edge/test-ward", 7, [0x11; 32]);

    let before = anvil.rpc("evm_snapshot", json!([]));
    let first = ledger.submit(&a).await.unwrap();
    anvil.mined(&first);
    let mined_in = anvil.block_number();
    assert_eq!(
        status(&ledger, &a, &first).await,
        AnchorStatus::Pending { confirmations: 1 }
    );
    assert_eq!(anvil.rpc("evm_revert", json!([before])), json!(true));
    assert!(anvil.block_number() < mined_in, "the block is gone");
    assert_eq!(
        status(&ledger, &a, &first).await,
        AnchorStatus::Dropped,
        "reorged away: back to the outbox"
    );
    assert_eq!(ledger.find(&a).await.unwrap(), None);

    // The nonce comes from the chain again: the new transaction takes the dropped one's place
    // instead of waiting behind a gap (same nonce, fees and data: often the very same signed
    // transaction, under the same hash).
    let second = ledger.submit(&a).await.unwrap();
    anvil.mined(&second);
    anvil.mine(1);
    let receipt = confirmed(status(&ledger, &a, &second).await);
    let tx = anvil.rpc("eth_getTransactionByHash", json!([second.reference]));
    assert_eq!(quantity(&tx["nonce"]), 1, "the deployment was nonce 0");
    assert_eq!(ledger.find(&a).await.unwrap(), Some(receipt));
}

#[tokio::test]
async fn an_unreachable_chain_is_unavailable_and_anchoring_resumes_when_it_is_back() {
    let chain = Chain::start().await;
    let port = chain.anvil.port;
    let ledger = chain.ledger(1);
    let a = anchor("iomt-edge/test-ward", 3, [0x33; 32]);
    let sub = ledger.submit(&a).await.unwrap();
    chain.anvil.mined(&sub);
    confirmed(status(&ledger, &a, &sub).await);

    let Chain {
        anvil,
        keys,
        contract,
    } = chain;
    drop(anvil);
    let unavailable = |e: LedgerError| match e {
        LedgerError::Unavailable { ledger, reason } => {
            assert_eq!(ledger, "ethereum");
            reason
        }
        other => panic!("not Unavailable: {other}"),
    };
    let reason = unavailable(ledger.submit(&a).await.unwrap_err());
    assert!(
        reason.contains(&format!("http://127.0.0.1:{port}")) && reason.contains("onnect"),
        "names the endpoint and the failure: {reason}"
    );
    let reason = unavailable(ledger.status(&a, &sub).await.unwrap_err());
    assert!(reason.contains("eth_getTransactionReceipt"), "{reason}");
    unavailable(ledger.find(&a).await.unwrap_err());

    // A fresh chain on the same port, the contract deployed again by the same key at the same
    // nonce, so at the same address: the same ledger anchors again.
    let anvil = Anvil::start_on(port);
    assert_eq!(fund_and_deploy(&anvil, keys.path()).await, contract);
    let sub = ledger.submit(&a).await.unwrap();
    anvil.mined(&sub);
    let receipt = confirmed(status(&ledger, &a, &sub).await);
    assert_eq!(ledger.find(&a).await.unwrap(), Some(receipt));
}

#[tokio::test]
async fn a_node_that_does_not_answer_is_unavailable_within_the_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let keys = tempfile::tempdir().unwrap();
    let options = EthereumOptions {
        timeout: Duration::from_millis(300),
        ..EthereumOptions::new(
            format!("http://127.0.0.1:{port}/v3/SECRET-API-KEY")
                .parse()
                .unwrap(),
            "0x5FbDB2315678afecb367f032d93F642f64180aa3"
                .parse()
                .unwrap(),
        )
    };
    let ledger = options.build(keys.path()).unwrap();
    let started = Instant::now();
    let err = ledger
        .submit(&anchor("iomt-edge/w", 1, [1; 32]))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = err.to_string();
    assert!(
        matches!(err, LedgerError::Unavailable { .. }) && text.contains("no answer within 300ms"),
        "{text}"
    );
    assert!(
        !text.contains("SECRET"),
        "the endpoint's path is never shown: {text}"
    );
    drop(silent);
}

#[tokio::test]
async fn anchoring_the_same_checkpoint_twice_is_harmless_even_across_a_restart() {
    let chain = Chain::start().await;
    let anvil = &chain.anvil;
    let a = anchor("iomt-edge/test-ward", 9, [0x99; 32]);
    anvil.automine(false);
    let first = chain.ledger(1).submit(&a).await.unwrap();
    // A restarted node with its first transaction still in the pool: the pending nonce puts
    // the second one after it instead of clashing with it.
    let restarted = chain.ledger(1);
    let second = restarted.submit(&a).await.unwrap();
    assert_ne!(first.reference, second.reference);
    anvil.mine(1);
    let r1 = confirmed(status(&restarted, &a, &first).await);
    let r2 = confirmed(status(&restarted, &a, &second).await);
    assert_ne!(r1, r2, "two events, each its own receipt");
    let nonces: Vec<u64> = [&first, &second]
        .iter()
        .map(|s| quantity(&anvil.rpc("eth_getTransactionByHash", json!([s.reference]))["nonce"]))
        .collect();
    assert_eq!(nonces, [1, 2]);
    // The earliest event is the one that dates the checkpoint.
    assert_eq!(restarted.find(&a).await.unwrap(), Some(r1));
}

#[tokio::test]
async fn find_needs_the_same_size_origin_and_enough_confirmations() {
    let chain = Chain::start().await;
    let anvil = &chain.anvil;
    let ledger = chain.ledger(2);
    let a = anchor("iomt-edge/test-ward", 5, [0x55; 32]);
    assert_eq!(ledger.find(&a).await.unwrap(), None, "not anchored yet");
    let sub = ledger.submit(&a).await.unwrap();
    anvil.mined(&sub);
    assert_eq!(
        ledger.find(&a).await.unwrap(),
        None,
        "one block deep of the two asked for"
    );
    anvil.mine(1);
    let found = ledger.find(&a).await.unwrap().expect("anchored");
    assert_eq!(found, confirmed(status(&ledger, &a, &sub).await));

    let other_size = anchor("iomt-edge/test-ward", 6, [0x55; 32]);
    assert_eq!(ledger.find(&other_size).await.unwrap(), None);
    let other_origin = anchor("iomt-edge/other-ward", 5, [0x55; 32]);
    assert_eq!(ledger.find(&other_origin).await.unwrap(), None);
    // Its own submission does not pass for another checkpoint either.
    let err = ledger.status(&other_size, &sub).await.unwrap_err();
    assert!(
        matches!(err, LedgerError::Refused { .. })
            && err.to_string().contains("holds no Anchored event"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_chain_a_missing_or_wrong_contract_are_refused_with_the_reason() {
    let chain = Chain::start().await;
    let anvil = &chain.anvil;
    let a = anchor("iomt-edge/test-ward", 1, [0x01; 32]);
    let refused = |e: LedgerError| match e {
        LedgerError::Refused { reason, .. } => reason,
        other => panic!("not Refused: {other}"),
    };

    let wrong_chain = EthereumOptions {
        chain_id: Some(1),
        ..chain.options(1)
    }
    .build(chain.keys.path())
    .unwrap();
    let reason = refused(wrong_chain.submit(&a).await.unwrap_err());
    assert!(
        reason.contains("chain 31337") && reason.contains("chain 1"),
        "{reason}"
    );

    let nothing_there = "0x000000000000000000000000000000000000dEaD";
    let no_contract = EthereumOptions {
        contract: nothing_there.parse().unwrap(),
        ..chain.options(1)
    }
    .build(chain.keys.path())
    .unwrap();
    let reason = refused(no_contract.submit(&a).await.unwrap_err());
    assert!(
        reason.contains("no contract at") && reason.contains(nothing_there),
        "{reason}"
    );

    // Code that reverts every call: the node refuses to send it (gas estimation fails).
    let reverts = "0x00000000000000000000000000000000000Fd00d";
    anvil.rpc("anvil_setCode", json!([reverts, "0x60006000fd"]));
    let reverting = EthereumOptions {
        contract: reverts.parse().unwrap(),
        ..chain.options(1)
    }
    .build(chain.keys.path())
    .unwrap();
    let reason = refused(reverting.submit(&a).await.unwrap_err());
    assert!(reason.contains("revert"), "{reason}");

    // Code that accepts the call and emits nothing: mined, and refused as no anchor.
    let silent = "0x0000000000000000000000000000000000005709";
    anvil.rpc("anvil_setCode", json!([silent, "0x00"]));
    let emits_nothing = EthereumOptions {
        contract: silent.parse().unwrap(),
        ..chain.options(1)
    }
    .build(chain.keys.path())
    .unwrap();
    let sub = emits_nothing.submit(&a).await.unwrap();
    anvil.mined(&sub);
    let reason = refused(emits_nothing.status(&a, &sub).await.unwrap_err());
    assert!(
        reason.contains(&sub.reference) && reason.contains("holds no Anchored event"),
        "{reason}"
    );
}

#[test]
fn the_committed_artefact_is_what_the_source_compiles_to() {
    let solcjs = tool("IOMT_SOLCJS", "solcjs");
    // solcjs on PATH is npm's link to the package's solc.js.
    let solcjs = std::fs::canonicalize(&solcjs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("IomtAnchor.json");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let build = Command::new("bash")
        .arg(root.join("contracts/build.sh"))
        .arg(&out)
        .env("IOMT_SOLCJS", &solcjs)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "contracts/build.sh: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let fresh: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let committed: Value =
        serde_json::from_slice(&std::fs::read(root.join("contracts/IomtAnchor.json")).unwrap())
            .unwrap();
    for field in ["compiler", "settings", "abi", "bytecode"] {
        assert_eq!(
            fresh[field], committed[field],
            "contracts/IomtAnchor.json's {field} is stale: run contracts/build.sh"
        );
    }
    assert!(committed["bytecode"].as_str().unwrap().len() > 100);
}
