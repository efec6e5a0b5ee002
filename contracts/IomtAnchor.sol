// SPDX-License-Identifier: Apache-2.0
// Rebuild the committed artefact (IomtAnchor.json) with contracts/build.sh; tests/ethereum.rs
// checks that it still matches this source.
pragma solidity 0.8.37;

/// @title Anchors of iomt-edge checkpoints.
/// @notice An iomt-edge node calls `anchor` with each signed checkpoint of its transparency log
/// (a C2SP tlog checkpoint: origin line, tree size, root hash). The event, not storage, is the
/// record: it costs no storage gas, and a verifier finds it with `eth_getLogs` filtered on this
/// contract's address and topic1 = the root, without trusting the node.
/// @dev The contract keeps no state on purpose. Anchoring the same (root, treeSize, originHash)
/// twice, as a node may after a crash or a reorg, emits a second identical event: both say the
/// same thing, a verifier takes the earliest, and every anchoring transaction carries its own
/// event, so a node checks its transaction from that transaction's receipt alone. A mapping to
/// make a repeat a no-op would cost a 20,000-gas storage write on every first anchor to save a
/// duplicate log that harms nobody.
contract IomtAnchor {
    /// @param root The checkpoint's root hash (RFC 6962 Merkle tree head of the node's log).
    /// @param treeSize The checkpoint's tree size (number of batches in the log).
    /// @param originHash SHA-256 of the checkpoint's origin line (its first line, without the
    /// newline): names the log, e.g. `iomt-edge/ward`.
    /// @param submitter The account that sent the anchor: the node's own Ethereum key.
    event Anchored(
        bytes32 indexed root,
        uint64 treeSize,
        bytes32 indexed originHash,
        address indexed submitter
    );

    /// @notice Records a checkpoint. Anyone may call it: what binds a checkpoint to a node is its
    /// Ed25519 signature in the signed note, which a verifier checks; the anchor adds the time by
    /// which the checkpoint existed, and `submitter` says who vouched for it on chain.
    function anchor(bytes32 root, uint64 treeSize, bytes32 originHash) external {
        emit Anchored(root, treeSize, originHash, msg.sender);
    }
}
