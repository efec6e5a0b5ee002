#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/image-test.sh. `need CMD PACKAGE [CMD PACKAGE …]`
# installs, with apt, the Debian package of each command that is missing (idempotent: nothing
# is installed when every command is there).

need() {
  local missing=()
  while [ $# -gt 0 ]; do
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || missing+=("$2")
    shift 2
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]}"
  local sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
}
