#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then cargo test.
# Idempotent: installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# The external-broker tests run against a real mosquitto.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto (external-broker tests)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq mosquitto >/dev/null
fi
export PATH="$PATH:/usr/sbin"

# The fuzz targets' libFuzzer is C++.
if ! command -v c++ >/dev/null 2>&1; then
  echo "installing g++ (the fuzz targets' libFuzzer)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq g++ >/dev/null
fi

cargo test --locked "$@"
# The fuzz targets (fuzz/, their own crate) must keep building against the codecs they fuzz;
# running them is `cargo fuzz run` (README, Fuzzing).
cargo check --locked --manifest-path fuzz/Cargo.toml --bins
