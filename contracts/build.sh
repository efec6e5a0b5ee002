#!/usr/bin/env bash
# Compiles IomtAnchor.sol with solc-js from npm and writes its artefact (ABI, bytecode, compiler
# version and settings) to contracts/IomtAnchor.json, or to the file named as the argument.
#
# The compiler is the npm package `solc` at the version scripts/tools.sh pins, installed outside
# the clone; IOMT_SOLCJS, when set, names its solc.js instead. It is driven through its standard
# JSON interface rather than the solcjs command line so that every setting that changes the
# bytecode is written down here: the optimizer (on, 200 runs, as `solcjs --optimize`), the EVM
# version (london: no PUSH0, so the contract also deploys on chains that have not taken up
# Shanghai, as many permissioned chains have not) and the source's name, which the metadata
# hash at the end of the bytecode covers. The same source, compiler and settings always give
# the same bytes: tests/ethereum.rs rebuilds it and compares with the committed artefact.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/IomtAnchor.json}"
if [ -z "${IOMT_SOLCJS:-}" ]; then
  # shellcheck source=../scripts/tools.sh
  source "$here/../scripts/tools.sh"
fi
[ -f "$IOMT_SOLCJS" ] || { echo "$IOMT_SOLCJS: no solc-js here (run scripts/test.sh)" >&2; exit 1; }

node - "$IOMT_SOLCJS" "$here/IomtAnchor.sol" "$out" <<'JS'
const fs = require("fs");
const path = require("path");
const [solcjs, source, out] = process.argv.slice(2);
const solc = require(path.join(path.dirname(solcjs), "index.js"));
const settings = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "london",
  outputSelection: { "*": { IomtAnchor: ["abi", "evm.bytecode.object"] } },
};
const input = {
  language: "Solidity",
  sources: { "IomtAnchor.sol": { content: fs.readFileSync(source, "utf8") } },
  settings,
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);
const c = output.contracts["IomtAnchor.sol"].IomtAnchor;
const artefact = {
  contractName: "IomtAnchor",
  source: "contracts/IomtAnchor.sol",
  compiler: "solc-js " + solc.version(),
  settings: { optimizer: settings.optimizer, evmVersion: settings.evmVersion },
  abi: c.abi,
  bytecode: "0x" + c.evm.bytecode.object,
};
fs.writeFileSync(out, JSON.stringify(artefact, null, 2) + "\n");
console.error("wrote " + out);
JS
