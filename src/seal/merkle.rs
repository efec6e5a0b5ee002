//! RFC 6962 / RFC 9162 Merkle tree hashing: leaf and node hashes, the tree head, inclusion and
//! consistency proofs and their verification.
//!
//! Hand-written because the well-kept Rust implementations either pull in a second crypto
//! library or hash the empty tree and odd nodes differently from RFC 6962; this one is checked
//! against the RFC's own test values (tests/vectors/merkle-rfc6962.json).

use ring::digest::{Context, SHA256};

pub type Hash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("index {index} is outside a tree of size {size}")]
    OutOfRange { index: u64, size: u64 },
    #[error("the proof has the wrong length")]
    WrongLength,
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
}

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(data);
    finish(ctx)
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The hash of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    finish(Context::new(&SHA256))
}

/// The Merkle tree hash of a list of leaf hashes. Pairing left to right level by level, with an
/// odd last node carried up unchanged, gives exactly RFC 6962's split at the largest power of two.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => return empty_root(),
        1 => return leaves[0],
        _ => {}
    }
    let mut level: Vec<Hash> = leaves
        .chunks(2)
        .map(|p| {
            if p.len() == 2 {
                node_hash(&p[0], &p[1])
            } else {
                p[0]
            }
        })
        .collect();
    while level.len() > 1 {
        let n = level.len();
        for i in 0..n / 2 {
            level[i] = node_hash(&level[2 * i], &level[2 * i + 1]);
        }
        if n % 2 == 1 {
            level[n / 2] = level[n - 1];
        }
        level.truncate(n.div_ceil(2));
    }
    level[0]
}

/// The right edge of an RFC 6962 tree grown leaf by leaf: the roots of its complete subtrees,
/// largest first, O(log n) of them. Gives the root at every size without keeping the leaves.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    size: u64,
    /// (height, hash) of each complete subtree, left to right.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0, leaf);
        while let Some(&(h, left)) = self.nodes.last() {
            if h != node.0 {
                break;
            }
            self.nodes.pop();
            node = (h + 1, node_hash(&left, &node.1));
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// The root of the tree of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// The largest power of two strictly below `n` (n >= 2).
fn split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The audit path of leaf `index` (RFC 6962 2.1.1), leaf to root.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Result<Vec<Hash>, ProofError> {
    if index >= leaves.len() {
        return Err(ProofError::OutOfRange {
            index: index as u64,
            size: leaves.len() as u64,
        });
    }
    let mut path = Vec::new();
    let (mut lo, mut hi, mut m) = (0, leaves.len(), index);
    let mut siblings = Vec::new();
    while hi - lo > 1 {
        let k = split(hi - lo);
        if m < k {
            siblings.push(root(&leaves[lo + k..hi]));
            hi = lo + k;
        } else {
            siblings.push(root(&leaves[lo..lo + k]));
            lo += k;
            m -= k;
        }
    }
    path.extend(siblings.into_iter().rev());
    Ok(path)
}

/// Verifies an audit path (RFC 9162 2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    path: &[Hash],
    expected_root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange { index, size });
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return Err(ProofError::WrongLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != expected_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The consistency proof between the tree of the first `size1` leaves and the whole list
/// (RFC 6962 2.1.2).
pub fn consistency_proof(leaves: &[Hash], size1: usize) -> Result<Vec<Hash>, ProofError> {
    if size1 > leaves.len() {
        return Err(ProofError::OutOfRange {
            index: size1 as u64,
            size: leaves.len() as u64,
        });
    }
    if size1 == 0 || size1 == leaves.len() {
        return Ok(Vec::new());
    }
    fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
        let n = d.len();
        if m == n {
            if !complete {
                out.push(root(d));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            subproof(m, &d[..k], complete, out);
            out.push(root(&d[k..]));
        } else {
            subproof(m - k, &d[k..], false, out);
            out.push(root(&d[..k]));
        }
    }
    let mut out = Vec::new();
    subproof(size1, leaves, true, &mut out);
    Ok(out)
}

/// Verifies a consistency proof (RFC 9162 2.1.4.2).
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if size1 > size2 {
        return Err(ProofError::OutOfRange {
            index: size1,
            size: size2,
        });
    }
    if size1 == size2 {
        return if proof.is_empty() && root1 == root2 {
            Ok(())
        } else if !proof.is_empty() {
            Err(ProofError::WrongLength)
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if size1 == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if size1.is_power_of_two() {
        path.push(*root1);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::WrongLength);
    };
    let (mut fnode, mut snode) = (size1 - 1, size2 - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return Err(ProofError::WrongLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != root1 || &sr != root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

pub fn to_hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/merkle-rfc6962.json"
        )))
        .unwrap()
    }

    fn hash(v: &Value) -> Hash {
        from_hex(v.as_str().unwrap()).unwrap().try_into().unwrap()
    }

    fn leaves(v: &Value) -> Vec<Hash> {
        v["leaves_hex"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| leaf_hash(&from_hex(l.as_str().unwrap()).unwrap()))
            .collect()
    }

    #[test]
    fn roots_match_rfc6962_vectors() {
        let v = vectors();
        let leaves = leaves(&v);
        for (size, expected) in v["roots_by_size"].as_object().unwrap() {
            let size: usize = size.parse().unwrap();
            assert_eq!(
                to_hex(&root(&leaves[..size])),
                expected.as_str().unwrap(),
                "size {size}"
            );
        }
    }

    #[test]
    fn inclusion_proofs_match_and_verify() {
        let v = vectors();
        let leaves = leaves(&v);
        for case in v["inclusion"].as_array().unwrap() {
            let index = case["leaf_index"].as_u64().unwrap();
            let size = case["tree_size"].as_u64().unwrap();
            let expected: Vec<Hash> = case["proof"].as_array().unwrap().iter().map(hash).collect();
            let tree = &leaves[..size as usize];
            let proof = inclusion_proof(tree, index as usize).unwrap();
            assert_eq!(proof, expected);
            let r = root(tree);
            verify_inclusion(&tree[index as usize], index, size, &proof, &r).unwrap();
            // Any other leaf, or a proof cut short, must fail.
            let other = &tree[(index as usize + 1) % tree.len()];
            assert!(verify_inclusion(other, index, size, &proof, &r).is_err());
            assert!(verify_inclusion(&tree[index as usize], index, size, &proof[1..], &r).is_err());
        }
    }

    #[test]
    fn every_leaf_of_every_size_verifies() {
        let all: Vec<Hash> = (0..33u8).map(|i| leaf_hash(&[i])).collect();
        for size in 1..=all.len() {
            let tree = &all[..size];
            let r = root(tree);
            for i in 0..size {
                let p = inclusion_proof(tree, i).unwrap();
                verify_inclusion(&tree[i], i as u64, size as u64, &p, &r).unwrap();
            }
            for size1 in 0..=size {
                let p = consistency_proof(tree, size1).unwrap();
                let r1 = root(&tree[..size1]);
                verify_consistency(size1 as u64, size as u64, &r1, &r, &p).unwrap();
            }
        }
    }

    #[test]
    fn consistency_proofs_match_and_verify() {
        let v = vectors();
        let leaves = leaves(&v);
        for case in v["consistency"].as_array().unwrap() {
            let size1 = case["size1"].as_u64().unwrap() as usize;
            let size2 = case["size2"].as_u64().unwrap() as usize;
            let expected: Vec<Hash> = case["proof"].as_array().unwrap().iter().map(hash).collect();
            let proof = consistency_proof(&leaves[..size2], size1).unwrap();
            assert_eq!(proof, expected);
            let (r1, r2) = (root(&leaves[..size1]), root(&leaves[..size2]));
            verify_consistency(size1 as u64, size2 as u64, &r1, &r2, &proof).unwrap();
            assert_eq!(
                verify_consistency(size1 as u64, size2 as u64, &r2, &r2, &proof),
                Err(ProofError::RootMismatch)
            );
        }
    }

    #[test]
    fn a_frontier_gives_the_root_at_every_size() {
        let leaves: Vec<Hash> = (0..70u8).map(|i| leaf_hash(&[i])).collect();
        let mut f = Frontier::default();
        assert_eq!(f.root(), empty_root());
        for (n, l) in leaves.iter().enumerate() {
            f.push(*l);
            assert_eq!(f.size(), n as u64 + 1);
            assert_eq!(f.root(), root(&leaves[..=n]), "{n}");
        }
    }
}
