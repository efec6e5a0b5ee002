//! The `ethereum` ledger backend: anchors signed checkpoints on any Ethereum JSON-RPC chain
//! (geth, Besu, GoQuorum, anvil) by calling the anchor contract of `contracts/IomtAnchor.sol`,
//! whose `Anchored` event carries the checkpoint's root, tree size and origin hash.
//!
//! Transactions are signed here with the node's own secp256k1 key, `<keys>/ethereum.key`
//! (created on first need with the rules of the node's other keys, src/seal/keys.rs), and sent
//! with `eth_sendRawTransaction`: the RPC node never holds the key. The nonce of each
//! transaction is the node's *pending* transaction count, asked for at each submission under a
//! lock, never a counter kept here: a restart, a transaction still in the pool, or one dropped
//! or reorged away all leave the RPC node's count right, where a cached counter would leave a
//! gap that wedges every later transaction.
//!
//! An anchor counts as done once its block is `confirmations` deep (its own block counts as
//! one) and still canonical; a receipt that disappears (a reorg, a transaction evicted from the
//! pool) makes [`AnchorStatus::Dropped`], so the outbox submits it again.

use std::future::IntoFuture;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, Bytes, B256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{BlockNumberOrTag, Filter, Log, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolEvent};
use alloy::transports::{RpcError, TransportError, TransportErrorKind};
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_platform_verifier::BuilderVerifierExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};
use url::Url;

use crate::ledger::{
    Anchor, AnchorStatus, BoxFuture, Ledger, LedgerError, Receipt as LedgerReceipt, Submission,
};
use crate::seal::keys::{create_key, read_key, sync_dir, KeyError};

/// The node's secp256k1 key, in the keys directory: 32 bytes as hex, one line.
pub const ETHEREUM_KEY_FILE: &str = "ethereum.key";

/// The backend's name in metrics, logs and errors.
const NAME: &str = "ethereum";

/// The compiled anchor contract (contracts/build.sh writes it; tests/ethereum.rs checks it
/// against the source).
const ARTEFACT: &str = include_str!("../../contracts/IomtAnchor.json");

alloy::sol! {
    /// contracts/IomtAnchor.sol's event (a unit test checks it against the artefact's ABI).
    event Anchored(
        bytes32 indexed root,
        uint64 treeSize,
        bytes32 indexed originHash,
        address indexed submitter
    );

    /// contracts/IomtAnchor.sol's one function.
    function anchor(bytes32 root, uint64 treeSize, bytes32 originHash) external;
}

const fn default_confirmations() -> u64 {
    2
}

const fn default_poll_every() -> Duration {
    Duration::from_secs(2)
}

const fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[ledger.ethereum]` in the pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EthereumOptions {
    /// The chain's JSON-RPC endpoint, `http://` or `https://`. Only its scheme, host and port
    /// ever appear in logs and errors: endpoints often carry an API key in their path.
    pub rpc: Url,
    /// The anchor contract's address (`iomt-edge ledger deploy` prints it).
    pub contract: Address,
    /// How many blocks deep, its own block included, an anchor must be to count as done.
    #[serde(default = "default_confirmations")]
    pub confirmations: u64,
    /// How often the outbox asks where a submitted anchor stands.
    #[serde(default = "default_poll_every", with = "humantime_serde")]
    pub poll_every: Duration,
    /// The chain id the RPC node must report; anchoring is refused on any other chain.
    #[serde(default)]
    pub chain_id: Option<u64>,
    /// How long one JSON-RPC call may take before the chain counts as unavailable.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The first block `find` searches for anchors: the contract's deployment block spares the
    /// RPC node a scan from genesis (public endpoints limit the range of `eth_getLogs`).
    #[serde(default)]
    pub from_block: u64,
}

impl EthereumOptions {
    /// Options with every default: what `[ledger.ethereum]` with only `rpc` and `contract` means.
    pub fn new(rpc: Url, contract: Address) -> Self {
        EthereumOptions {
            rpc,
            contract,
            confirmations: default_confirmations(),
            poll_every: default_poll_every(),
            chain_id: None,
            timeout: default_timeout(),
            from_block: 0,
        }
    }

    /// Checks the options and loads (or creates) the node's Ethereum key from `keys_dir`.
    /// Talks to no chain: a node whose chain is down still starts, and its outbox waits.
    pub fn build(&self, keys_dir: &Path) -> Result<EthereumLedger, EthereumError> {
        self.check()?;
        let signer = load_or_create_key(keys_dir)?;
        self.with_signer(signer, true)
    }

    /// A backend that only reads the chain, for checking anchors (`verify --rpc`,
    /// `verify-proof --rpc`): no key is read or created, and it refuses to submit.
    pub fn reader(&self) -> Result<EthereumLedger, EthereumError> {
        self.check()?;
        // Never signs anything: `submit` refuses before it would. The provider just needs one.
        let signer = PrivateKeySigner::from_bytes(&B256::repeat_byte(0x11))
            .map_err(|e| EthereumError::Options(e.to_string()))?;
        self.with_signer(signer, false)
    }

    fn check(&self) -> Result<(), EthereumError> {
        if self.confirmations == 0 {
            return Err(EthereumError::Options(
                "confirmations must be at least 1 (the anchor's own block)".into(),
            ));
        }
        if self.timeout.is_zero() || self.poll_every.is_zero() {
            return Err(EthereumError::Options(
                "timeout and poll_every must be longer than 0s".into(),
            ));
        }
        Ok(())
    }

    fn with_signer(
        &self,
        signer: PrivateKeySigner,
        can_submit: bool,
    ) -> Result<EthereumLedger, EthereumError> {
        let address = signer.address();
        let provider = connect(&self.rpc, self.timeout, signer)?;
        Ok(EthereumLedger {
            can_submit,
            options: self.clone(),
            endpoint: endpoint(&self.rpc),
            provider,
            address,
            chain: tokio::sync::OnceCell::new(),
            sending: tokio::sync::Mutex::new(()),
        })
    }
}

/// What building the backend or deploying the contract can fail on.
#[derive(Debug, thiserror::Error)]
pub enum EthereumError {
    #[error("ethereum key: {0}")]
    Key(#[from] KeyError),
    #[error("[ledger.ethereum]: {0}")]
    Options(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(
        "the node's ethereum account {address} has no ether on chain {chain_id}: send it some \
         for gas, then try again"
    )]
    Unfunded { address: Address, chain_id: u64 },
    #[error("deploying the anchor contract: {0}")]
    Deploy(String),
}

/// The `ethereum` backend: see the module documentation.
pub struct EthereumLedger {
    /// False for [`EthereumOptions::reader`].
    can_submit: bool,
    options: EthereumOptions,
    /// The RPC endpoint as logs and errors show it.
    endpoint: String,
    provider: DynProvider,
    address: Address,
    /// The chain id, once the RPC node has answered with the one the options ask for and the
    /// contract's code has been seen there.
    chain: tokio::sync::OnceCell<u64>,
    /// Held from asking for the nonce to sending: two submissions must not take the same one.
    sending: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for EthereumLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EthereumLedger")
            .field("endpoint", &self.endpoint)
            .field("contract", &self.options.contract)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl EthereumLedger {
    /// The node's Ethereum account: it pays for the anchors and is their `submitter`.
    pub fn address(&self) -> Address {
        self.address
    }

    pub fn options(&self) -> &EthereumOptions {
        &self.options
    }

    fn unavailable(&self, reason: String) -> LedgerError {
        LedgerError::Unavailable {
            ledger: NAME.into(),
            reason: format!("{}: {reason}", self.endpoint),
        }
    }

    fn refused(&self, reason: String) -> LedgerError {
        LedgerError::Refused {
            ledger: NAME.into(),
            reason,
        }
    }

    /// One JSON-RPC call `what`, bounded by the options' timeout, its error classified.
    async fn call<T>(
        &self,
        what: &str,
        call: impl IntoFuture<Output = Result<T, TransportError>>,
    ) -> Result<T, LedgerError> {
        rpc_call(&self.options.rpc, self.options.timeout, what, call)
            .await
            .map_err(|e| match e {
                Failure::Unavailable(reason) => self.unavailable(reason),
                Failure::Refused(reason) => self.refused(format!("{}: {reason}", self.endpoint)),
            })
    }

    /// The chain id, checked once against the options, with the contract's code seen there.
    async fn chain_id(&self) -> Result<u64, LedgerError> {
        self.chain
            .get_or_try_init(|| async {
                let id = self
                    .call("eth_chainId", self.provider.get_chain_id())
                    .await?;
                if let Some(want) = self.options.chain_id.filter(|w| *w != id) {
                    return Err(self.refused(format!(
                        "{} is on chain {id}, the pipeline file asks for chain {want}",
                        self.endpoint
                    )));
                }
                let code = self
                    .call(
                        "eth_getCode",
                        self.provider.get_code_at(self.options.contract),
                    )
                    .await?;
                if code.is_empty() {
                    return Err(self.refused(format!(
                        "no contract at {} on chain {id} (deploy one with `iomt-edge ledger \
                         deploy`)",
                        self.options.contract
                    )));
                }
                info!(
                    chain_id = id,
                    contract = %self.options.contract,
                    account = %self.address,
                    "ethereum ledger: anchoring as this account"
                );
                Ok(id)
            })
            .await
            .copied()
    }

    async fn submit_anchor(&self, anchor: &Anchor) -> Result<Submission, LedgerError> {
        if !self.can_submit {
            return Err(LedgerError::Refused {
                ledger: NAME.into(),
                reason: "this backend was opened to read the chain only".into(),
            });
        }
        let chain_id = self.chain_id().await?;
        let c = &anchor.checkpoint;
        let input = anchorCall {
            root: B256::from(c.root),
            treeSize: c.size,
            originHash: origin_hash(&c.origin),
        }
        .abi_encode();
        let _sending = self.sending.lock().await;
        let nonce = self
            .call(
                "eth_getTransactionCount",
                self.provider.get_transaction_count(self.address).pending(),
            )
            .await?;
        let tx = TransactionRequest::default()
            .with_from(self.address)
            .with_to(self.options.contract)
            .with_input(input)
            .with_nonce(nonce)
            .with_chain_id(chain_id);
        let sent = self
            .call("sending the anchor", self.provider.send_transaction(tx))
            .await?;
        let hash = *sent.tx_hash();
        debug!(tx = %hash, nonce, size = c.size, "ethereum ledger: anchor sent");
        Ok(Submission {
            reference: hash.to_string(),
            submitted_at: now_micros(),
        })
    }

    async fn anchor_status(
        &self,
        anchor: &Anchor,
        submission: &Submission,
    ) -> Result<AnchorStatus, LedgerError> {
        let chain_id = self.chain_id().await?;
        let hash: B256 = submission.reference.parse().map_err(|_| {
            self.refused(format!(
                "submission {:?} is not a transaction hash",
                submission.reference
            ))
        })?;
        let receipt = self
            .call(
                "eth_getTransactionReceipt",
                self.provider.get_transaction_receipt(hash),
            )
            .await?;
        let Some(receipt) = receipt else {
            let known = self
                .call(
                    "eth_getTransactionByHash",
                    self.provider.get_transaction_by_hash(hash),
                )
                .await?;
            return Ok(match known {
                Some(_) => AnchorStatus::Pending { confirmations: 0 },
                None => AnchorStatus::Dropped,
            });
        };
        let (Some(number), Some(block_hash)) = (receipt.block_number, receipt.block_hash) else {
            return Ok(AnchorStatus::Pending { confirmations: 0 });
        };
        // Sending it again would revert again and pay for it again: the outbox is told why
        // instead, and retries with its back-off.
        if !receipt.status() {
            return Err(self.refused(format!("transaction {hash} reverted in block {number}")));
        }
        let Some(log) = receipt.logs().iter().find(|log| self.anchors(log, anchor)) else {
            return Err(self.refused(format!(
                "transaction {hash} (block {number}) holds no Anchored event of {} for root {} \
                 and size {}",
                self.options.contract,
                hex(&anchor.checkpoint.root),
                anchor.checkpoint.size
            )));
        };
        let log_index = log.log_index.unwrap_or_default();
        self.confirmed(chain_id, hash, number, block_hash, log_index)
            .await
    }

    /// Whether `log` is this contract's `Anchored` event for exactly `anchor`.
    fn anchors(&self, log: &Log, anchor: &Anchor) -> bool {
        let c = &anchor.checkpoint;
        log.address() == self.options.contract
            && !log.removed
            && log.log_decode::<Anchored>().is_ok_and(|l| {
                let e = &l.inner.data;
                e.root == B256::from(c.root)
                    && e.treeSize == c.size
                    && e.originHash == origin_hash(&c.origin)
            })
    }

    /// The status of an anchor found in block `number`: confirmed once deep enough, if that
    /// block is still the chain's.
    async fn confirmed(
        &self,
        chain_id: u64,
        tx_hash: B256,
        number: u64,
        block_hash: B256,
        log_index: u64,
    ) -> Result<AnchorStatus, LedgerError> {
        let latest = self
            .call("eth_blockNumber", self.provider.get_block_number())
            .await?;
        let depth = (latest + 1).saturating_sub(number);
        if depth < self.options.confirmations {
            return Ok(AnchorStatus::Pending {
                confirmations: depth,
            });
        }
        // A node can still answer with a receipt or a log from a block a reorg has just
        // replaced: only the block now at that height counts.
        let canonical = self
            .call(
                "eth_getBlockByNumber",
                self.provider
                    .get_block_by_number(BlockNumberOrTag::Number(number)),
            )
            .await?
            .map(|b| b.header.hash);
        if canonical != Some(block_hash) {
            return Ok(AnchorStatus::Pending { confirmations: 0 });
        }
        Ok(AnchorStatus::Confirmed(LedgerReceipt::Ethereum {
            chain_id,
            contract: self.options.contract.to_checksum(None),
            tx_hash: tx_hash.to_string(),
            block_number: number,
            block_hash: block_hash.to_string(),
            log_index,
        }))
    }

    async fn find_anchor(&self, anchor: &Anchor) -> Result<Option<LedgerReceipt>, LedgerError> {
        let chain_id = self.chain_id().await?;
        let c = &anchor.checkpoint;
        let filter = Filter::new()
            .address(self.options.contract)
            .event_signature(Anchored::SIGNATURE_HASH)
            .topic1(B256::from(c.root))
            .from_block(self.options.from_block)
            .to_block(BlockNumberOrTag::Latest);
        let mut logs = self
            .call("eth_getLogs", self.provider.get_logs(&filter))
            .await?;
        // The earliest anchor is the one that dates the checkpoint.
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        for log in logs.iter().filter(|l| self.anchors(l, anchor)) {
            let (Some(number), Some(block_hash), Some(tx_hash)) =
                (log.block_number, log.block_hash, log.transaction_hash)
            else {
                continue;
            };
            let status = self
                .confirmed(
                    chain_id,
                    tx_hash,
                    number,
                    block_hash,
                    log.log_index.unwrap_or_default(),
                )
                .await?;
            if let AnchorStatus::Confirmed(receipt) = status {
                return Ok(Some(receipt));
            }
        }
        Ok(None)
    }
}

impl Ledger for EthereumLedger {
    fn name(&self) -> &str {
        NAME
    }

    fn submit<'a>(&'a self, anchor: &'a Anchor) -> BoxFuture<'a, Result<Submission, LedgerError>> {
        Box::pin(self.submit_anchor(anchor))
    }

    fn status<'a>(
        &'a self,
        anchor: &'a Anchor,
        submission: &'a Submission,
    ) -> BoxFuture<'a, Result<AnchorStatus, LedgerError>> {
        Box::pin(self.anchor_status(anchor, submission))
    }

    fn find<'a>(
        &'a self,
        anchor: &'a Anchor,
    ) -> BoxFuture<'a, Result<Option<LedgerReceipt>, LedgerError>> {
        Box::pin(self.find_anchor(anchor))
    }
}

/// Looks `anchor` up on the chain at `rpc` where `receipt` says it is: the receipt's chain and
/// contract, from its block on (public endpoints cap the range `eth_getLogs` may scan). Reads
/// only: no key is touched. `Ok(None)` when no anchor of that root, size and origin is there;
/// `Err` says why the lookup itself failed (a receipt of another backend, a bad URL or address,
/// an unreachable chain).
pub async fn find_as_receipt_says(
    rpc: &str,
    receipt: &LedgerReceipt,
    anchor: &Anchor,
) -> Result<Option<LedgerReceipt>, String> {
    let LedgerReceipt::Ethereum {
        chain_id,
        contract,
        block_number,
        ..
    } = receipt
    else {
        return Err("not an Ethereum receipt".into());
    };
    let url: Url = rpc.parse().map_err(|e| format!("--rpc {rpc}: {e}"))?;
    let contract: Address = contract
        .parse()
        .map_err(|_| format!("the receipt's contract {contract:?} is not an address"))?;
    let options = EthereumOptions {
        chain_id: Some(*chain_id),
        confirmations: 1,
        from_block: *block_number,
        ..EthereumOptions::new(url, contract)
    };
    let ledger = options.reader().map_err(|e| e.to_string())?;
    ledger.find(anchor).await.map_err(|e| e.to_string())
}

/// The event's `originHash`: SHA-256 of the checkpoint's origin line, without its newline.
pub fn origin_hash(origin: &str) -> B256 {
    B256::from_slice(digest(&SHA256, origin.as_bytes()).as_ref())
}

/// The anchor contract's creation bytecode, from the committed artefact.
pub fn contract_bytecode() -> Result<Bytes, EthereumError> {
    #[derive(Deserialize)]
    struct Artefact {
        bytecode: String,
    }
    let artefact: Artefact = serde_json::from_str(ARTEFACT)
        .map_err(|e| EthereumError::Deploy(format!("contracts/IomtAnchor.json: {e}")))?;
    artefact
        .bytecode
        .parse()
        .map_err(|e| EthereumError::Deploy(format!("contracts/IomtAnchor.json: bytecode: {e}")))
}

/// Deploys the anchor contract on the chain at `rpc`, paid for and signed by the node's
/// Ethereum key in `keys_dir` (created if there is none yet), and waits for it to be mined.
/// Returns the contract's address, for `[ledger.ethereum] contract` in the pipeline file.
pub async fn deploy(rpc: &str, keys_dir: &Path) -> Result<Address, EthereumError> {
    /// How long a deployment may wait to be mined: a public chain under load can take minutes.
    const MINED_WITHIN: Duration = Duration::from_secs(300);
    let url = parse_rpc(rpc)?;
    let timeout = default_timeout();
    let signer = load_or_create_key(keys_dir)?;
    let address = signer.address();
    let provider = connect(&url, timeout, signer)?;
    let shown = endpoint(&url);
    let call = |what: &'static str| {
        let shown = shown.clone();
        move |e: Failure| -> EthereumError {
            match e {
                Failure::Unavailable(reason) => LedgerError::Unavailable {
                    ledger: NAME.into(),
                    reason: format!("{shown}: {what}: {reason}"),
                }
                .into(),
                Failure::Refused(reason) => {
                    EthereumError::Deploy(format!("{shown}: {what}: {reason} (account {address})"))
                }
            }
        }
    };
    let chain_id = rpc_call(&url, timeout, "eth_chainId", provider.get_chain_id())
        .await
        .map_err(call("asking for the chain id"))?;
    let balance = rpc_call(
        &url,
        timeout,
        "eth_getBalance",
        provider.get_balance(address),
    )
    .await
    .map_err(call("asking for the account's balance"))?;
    if balance.is_zero() {
        return Err(EthereumError::Unfunded { address, chain_id });
    }
    let nonce = rpc_call(
        &url,
        timeout,
        "eth_getTransactionCount",
        provider.get_transaction_count(address).pending(),
    )
    .await
    .map_err(call("asking for the account's nonce"))?;
    let tx = TransactionRequest::default()
        .with_from(address)
        .with_deploy_code(contract_bytecode()?)
        .with_nonce(nonce)
        .with_chain_id(chain_id);
    let sent = rpc_call(&url, timeout, "sending", provider.send_transaction(tx))
        .await
        .map_err(call("sending the deployment"))?;
    let hash = *sent.tx_hash();
    info!(tx = %hash, chain_id, account = %address, "anchor contract deployment sent");
    let deadline = Instant::now() + MINED_WITHIN;
    let receipt = loop {
        let receipt = rpc_call(
            &url,
            timeout,
            "eth_getTransactionReceipt",
            provider.get_transaction_receipt(hash),
        )
        .await
        .map_err(call("waiting for the deployment"))?;
        match receipt {
            Some(r) if r.block_number.is_some() => break r,
            _ if Instant::now() > deadline => {
                return Err(EthereumError::Deploy(format!(
                    "transaction {hash} not mined within {MINED_WITHIN:?}"
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    if !receipt.status() {
        return Err(EthereumError::Deploy(format!(
            "transaction {hash} reverted (gas used {})",
            receipt.gas_used
        )));
    }
    let contract = receipt.contract_address.ok_or_else(|| {
        EthereumError::Deploy(format!("transaction {hash}'s receipt names no contract"))
    })?;
    let code = rpc_call(&url, timeout, "eth_getCode", provider.get_code_at(contract))
        .await
        .map_err(call("checking the deployed code"))?;
    if code.is_empty() {
        return Err(EthereumError::Deploy(format!(
            "transaction {hash} was mined but {contract} holds no code"
        )));
    }
    info!(%contract, chain_id, block = receipt.block_number, "anchor contract deployed");
    Ok(contract)
}

fn parse_rpc(rpc: &str) -> Result<Url, EthereumError> {
    rpc.parse()
        .map_err(|e| EthereumError::Options(format!("rpc {rpc:?}: {e}")))
}

/// The endpoint as logs and errors show it: scheme, host and port, never the path or the
/// credentials, where providers put their API keys.
fn endpoint(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// A provider that signs with `signer`, fills in gas and fees from the node, and nothing else:
/// the nonce and chain id are set by the callers, from the node, at each transaction.
fn connect(
    url: &Url,
    timeout: Duration,
    signer: PrivateKeySigner,
) -> Result<DynProvider, EthereumError> {
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(EthereumError::Options(format!(
                "rpc: {other}:// is not supported, only http:// and https://"
            )))
        }
    }
    // rustls on ring: ring is this crate's crypto library, and the process-wide default
    // provider is left alone.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_platform_verifier())
    .map_err(|e| EthereumError::Options(format!("TLS for the rpc endpoint: {e}")))?
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        // Each call is bounded by `timeout` around it (rpc_call), which names the call.
        .connect_timeout(timeout)
        .build()
        .map_err(|e| EthereumError::Options(format!("the rpc endpoint's HTTP client: {e}")))?;
    Ok(ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .wallet(EthereumWallet::from(signer))
        .connect_reqwest(client, url.clone())
        .erased())
}

/// Why a JSON-RPC call failed: the chain cannot answer now, or it answered no.
enum Failure {
    Unavailable(String),
    Refused(String),
}

/// Node errors that a later attempt with a fresh nonce and fresh fees gets past.
const TRANSIENT: &[&str] = &[
    "nonce too low",
    "replacement transaction underpriced",
    "already known",
    "txpool is full",
    "transaction underpriced",
];

async fn rpc_call<T>(
    url: &Url,
    timeout: Duration,
    what: &str,
    call: impl IntoFuture<Output = Result<T, TransportError>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(Failure::Unavailable(format!(
            "{what}: no answer within {timeout:?}"
        ))),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(url, what, e)),
    }
}

fn classify(url: &Url, what: &str, e: TransportError) -> Failure {
    // reqwest names the whole URL in its errors; the endpoint's path may hold an API key.
    let text = error_chain(&e).replace(url.as_str(), &endpoint(url));
    let reason = format!("{what}: {text}");
    match &e {
        RpcError::ErrorResp(payload) => {
            let message = payload.message.to_lowercase();
            if TRANSIENT.iter().any(|t| message.contains(t)) {
                Failure::Unavailable(reason)
            } else {
                Failure::Refused(reason)
            }
        }
        RpcError::LocalUsageError(_) => Failure::Refused(reason),
        RpcError::Transport(TransportErrorKind::HttpError(h))
            if h.status == 401 || h.status == 403 =>
        {
            Failure::Refused(reason)
        }
        _ => Failure::Unavailable(reason),
    }
}

/// An error and its causes, each said once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The node's Ethereum signer from `<keys_dir>/ethereum.key`, created (mode 0600 in a 0700
/// directory, synced) when there is none. A key file others can read is refused. The key is
/// never logged; its address is.
pub fn load_or_create_key(keys_dir: &Path) -> Result<PrivateKeySigner, KeyError> {
    let dir_existed = keys_dir.is_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(keys_dir)
        .map_err(|source| KeyError::Io {
            path: keys_dir.to_owned(),
            source,
        })?;
    let path = keys_dir.join(ETHEREUM_KEY_FILE);
    if let Some(bytes) = read_key(&path)? {
        return parse_key(&path, &bytes);
    }
    let rng = SystemRandom::new();
    let signer = loop {
        let mut secret = [0u8; 32];
        rng.fill(&mut secret).map_err(|_| KeyError::Random)?;
        // Zero and values past the curve order are no keys; 2^-128 odds, but cheap to rule out.
        if let Ok(s) = PrivateKeySigner::from_slice(&secret) {
            break s;
        }
    };
    let text = format!("{}\n", hex(&signer.to_bytes()[..]));
    match create_key(&path, text.as_bytes()) {
        Ok(()) => {}
        // Another process (a `deploy` beside the service) made it first: theirs is the key.
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = read_key(&path)?.ok_or(KeyError::Missing { path: path.clone() })?;
            return parse_key(&path, &bytes);
        }
        Err(e) => return Err(e),
    }
    // The key pays for and signs every anchor: its name must survive a crash like its bytes.
    sync_dir(keys_dir)?;
    if !dir_existed {
        if let Some(parent) = keys_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    info!(
        path = %path.display(),
        address = %signer.address(),
        "created the node's ethereum key"
    );
    Ok(signer)
}

fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeySigner, KeyError> {
    let invalid = |reason: &str| KeyError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|_| invalid("not UTF-8"))?
        .trim();
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("expected 64 hex digits (a 32-byte secp256k1 key)"));
    }
    let mut secret = [0u8; 32];
    for (i, byte) in secret.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).expect("hex checked");
    }
    PrivateKeySigner::from_slice(&secret).map_err(|_| invalid("not a valid secp256k1 key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_bindings_match_the_artefact_abi() {
        let artefact: serde_json::Value = serde_json::from_str(ARTEFACT).unwrap();
        let signature = |name: &str| {
            let item = artefact["abi"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == name)
                .unwrap_or_else(|| panic!("{name} not in the ABI"));
            let types: Vec<&str> = item["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["type"].as_str().unwrap())
                .collect();
            format!("{name}({})", types.join(","))
        };
        assert_eq!(signature("Anchored"), Anchored::SIGNATURE);
        assert_eq!(signature("anchor"), anchorCall::SIGNATURE);
        assert!(!contract_bytecode().unwrap().is_empty());
    }

    #[test]
    fn the_origin_hash_is_sha256_of_the_origin_line() {
        // printf 'iomt-edge/ward' | sha256sum
        assert_eq!(
            origin_hash("iomt-edge/ward").to_string(),
            format!("0x{}", hex(digest(&SHA256, b"iomt-edge/ward").as_ref()))
        );
    }

    #[test]
    fn creates_an_owner_only_key_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let a = load_or_create_key(&keys).unwrap();
        let path = keys.join(ETHEREUM_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let b = load_or_create_key(&keys).unwrap();
        assert_eq!(a.address(), b.address());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_or_create_key(&keys).unwrap_err();
        assert!(matches!(err, KeyError::Permissions { .. }), "{err}");
    }

    #[test]
    fn reads_a_key_written_by_hand_and_names_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ETHEREUM_KEY_FILE);
        // anvil's first development account: its address is public knowledge.
        let write = |text: &str| {
            let _ = std::fs::remove_file(&path);
            create_key(&path, text.as_bytes()).unwrap();
        };
        write("0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80\n");
        let s = load_or_create_key(dir.path()).unwrap();
        assert_eq!(
            s.address().to_checksum(None),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        );
        write("not a key\n");
        let err = load_or_create_key(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("ethereum.key") && err.contains("64 hex digits"),
            "{err}"
        );
        assert!(
            !err.contains("not a key"),
            "the file's text is not repeated: {err}"
        );
    }

    #[test]
    fn options_take_defaults_and_refuse_unknown_keys() {
        let o: EthereumOptions = toml::from_str(
            "rpc = \"http://127.0.0.1:8545\"\ncontract = \"0x5FbDB2315678afecb367f032d93F642f64180aa3\"",
        )
        .unwrap();
        assert_eq!(o, EthereumOptions::new(o.rpc.clone(), o.contract));
        assert_eq!((o.confirmations, o.poll_every), (2, Duration::from_secs(2)));
        let err = toml::from_str::<EthereumOptions>(
            "rpc = \"http://127.0.0.1:8545\"\ncontract = \"0x5FbDB2315678afecb367f032d93F642f64180aa3\"\nconfirmation = 3",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("confirmation"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let zero = EthereumOptions {
            confirmations: 0,
            ..o.clone()
        };
        let err = zero.build(dir.path()).unwrap_err().to_string();
        assert!(err.contains("confirmations"), "{err}");
        // An https endpoint gets its TLS client (rustls on ring) without touching the network.
        let https = EthereumOptions {
            rpc: "https://rpc.example/v3/KEY".parse().unwrap(),
            ..o.clone()
        };
        https.build(dir.path()).unwrap();
        let ws = EthereumOptions {
            rpc: "ws://rpc.example".parse().unwrap(),
            ..o
        };
        let err = ws.build(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ws:// is not supported"), "{err}");
    }

    #[test]
    fn errors_show_the_endpoint_without_its_path() {
        let url: Url = "https://user:secret@rpc.example:8545/v3/APIKEY"
            .parse()
            .unwrap();
        assert_eq!(endpoint(&url), "https://rpc.example:8545");
    }
}
