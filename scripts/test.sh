#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then cargo test.
# Idempotent: installs nothing that is already there. Missing Debian packages are installed
# with apt-get (through sudo when not root): mosquitto and mosquitto-clients (the external
# broker and interop tests), g++ (the fuzz targets' libFuzzer), nodejs and npm (for the npm
# packages of the Ethereum ledger's tests: solc and anvil, which scripts/tools.sh installs
# outside the clone, once), chromium (the dashboard's browser tests run it headless), prometheus
# (its promtool checks /metrics and deploy/prometheus/, tests/deploy.rs) and systemd (its
# systemd-analyze checks deploy/iomt-edge.service). Last, the container image test
# (scripts/image-test.sh, podman) when podman is there or apt-get can install it;
# IOMT_SKIP_IMAGE_TEST=1 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/need.sh

need mosquitto mosquitto mosquitto_pub mosquitto-clients c++ g++ node nodejs npm npm \
  chromium chromium promtool prometheus systemd-analyze systemd
export PATH="$PATH:/usr/sbin"
# Exports IOMT_ANVIL and IOMT_SOLCJS, which tests/ethereum.rs reads.
source scripts/tools.sh

# `failpoints` compiles in the fault-injection points the fault tests use (tests/faults.rs);
# they do nothing unless a test sets FAILPOINTS for the service it starts.
cargo test --locked --features failpoints "$@"
# The fuzz targets (fuzz/, their own crate) must keep building against the codecs they fuzz;
# running them is `cargo fuzz run` (README, Fuzzing).
cargo check --locked --manifest-path fuzz/Cargo.toml --bins

# The container image, built from deploy/Dockerfile and run with podman (about a minute with
# warm caches; the first run on a machine builds its base images and every crate).
if [ "${IOMT_SKIP_IMAGE_TEST:-}" = 1 ]; then
  echo "image test skipped (IOMT_SKIP_IMAGE_TEST=1)"
elif command -v podman >/dev/null 2>&1 || command -v apt-get >/dev/null 2>&1; then
  bash scripts/image-test.sh
else
  echo "image test skipped: no podman, and no apt-get to install it"
fi
