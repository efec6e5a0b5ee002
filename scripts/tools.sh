#!/usr/bin/env bash
# Sourced by scripts/test.sh and contracts/build.sh: installs the npm packages the Ethereum
# ledger needs outside the clone, in ${IOMT_TOOLS:-/var/tmp/iomt-edge-tools} (solc, the Solidity
# compiler, and anvil, the local chain the tests run), once: a version already there is not
# installed again. Exports IOMT_TOOLS, IOMT_SOLCJS and IOMT_ANVIL, which the tests read.
# Needs node and npm (scripts/test.sh installs them).

IOMT_SOLC_VERSION=0.8.37
IOMT_ANVIL_VERSION=1.7.1
IOMT_TOOLS="${IOMT_TOOLS:-/var/tmp/iomt-edge-tools}"

# The version of the npm package $1 installed in $IOMT_TOOLS, empty if none.
iomt_tool_version() {
  node -p "require(process.argv[1]).version" \
    "$IOMT_TOOLS/node_modules/$1/package.json" 2>/dev/null || true
}

if [ "$(iomt_tool_version solc)" != "$IOMT_SOLC_VERSION" ] ||
  [ "$(iomt_tool_version @foundry-rs/anvil-linux-amd64)" != "$IOMT_ANVIL_VERSION" ]; then
  echo "installing solc $IOMT_SOLC_VERSION and anvil $IOMT_ANVIL_VERSION into $IOMT_TOOLS" >&2
  mkdir -p "$IOMT_TOOLS"
  npm install --prefix "$IOMT_TOOLS" --save-exact --no-audit --no-fund --loglevel=error \
    "solc@$IOMT_SOLC_VERSION" "@foundry-rs/anvil-linux-amd64@$IOMT_ANVIL_VERSION" >&2
fi

export IOMT_TOOLS
export IOMT_SOLCJS="$IOMT_TOOLS/node_modules/solc/solc.js"
export IOMT_ANVIL="$IOMT_TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
