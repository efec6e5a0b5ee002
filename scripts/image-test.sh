#!/usr/bin/env bash
# The container image, tested for real with podman: builds deploy/Dockerfile (the very file a
# user builds), runs it with a data volume and its ports published on loopback, waits for its
# HEALTHCHECK, replays the demo ward into it, sees bed 3's alarms on its MQTT port and the
# readings in /metrics, stops it (graceful: exit 0, drained), runs a new container on the same
# volume and finds the alarms and every reading there (`iomt-edge verify` and `dump` in the
# image). scripts/test.sh runs it last; it takes about 1 minute once its caches are warm (README,
# Deploying; the first run on a machine debootstraps and compiles everything: ~15 minutes).
#
# No image registry is reachable from CI, so the base images are made here, once, into a cache
# outside the clone (${IOMT_IMAGE_CACHE:-/var/tmp/iomt-edge-image}): a minimal Debian 12
# (debootstrap, `podman import`) as the runtime image, and that plus gcc as the builder, into
# which this machine's Rust toolchain is mounted read-only, and its crate registry
# (~/.cargo/registry, which the tests' own build filled): the build takes its crates from there
# without the network. The Dockerfile's cache mount keeps the target between runs. Idempotent: containers and the volume it makes are
# removed before and after.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${IOMT_IMAGE_CACHE:-/var/tmp/iomt-edge-image}"
mkdir -p "$cache"
# podman on this machine needs runc and no default ulimits; a config of our own, so the
# machine's is left alone.
cat >"$cache/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$cache/containers.conf"

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
need podman podman runc runc debootstrap debootstrap mosquitto_sub mosquitto-clients curl curl
export PATH="$PATH:/usr/sbin"

start=$(date +%s)
step() { echo "image-test [$(($(date +%s) - start))s]: $*"; }

# The compose file must be one compose accepts: podman-compose (PyPI; Debian's is too old for
# `config`) in a virtualenv outside the clone, once.
tools="${IOMT_TOOLS:-/var/tmp/iomt-edge-tools}"
if [ ! -x "$tools/podman-compose/bin/podman-compose" ]; then
  step "installing podman-compose into $tools/podman-compose"
  python3 -m venv "$tools/podman-compose"
  "$tools/podman-compose/bin/pip" install -q podman-compose
fi
(cd deploy && "$tools/podman-compose/bin/podman-compose" -f compose.yaml config >/dev/null &&
  IOMT_PIPELINE=./pipeline-external.toml "$tools/podman-compose/bin/podman-compose" \
    -f compose.yaml --profile hospital-broker config >/dev/null) ||
  { echo "image-test FAILED: podman-compose config rejects deploy/compose.yaml" >&2; exit 1; }
fail() {
  echo "image-test FAILED: $*" >&2
  echo "(podman's own messages: $podman_log)" >&2
  for c in "$name" "$name-2"; do
    podman logs "$c" 2>/dev/null | tail -30 | sed "s/^/  $c: /" >&2 || true
  done
  exit 1
}

base=localhost/iomt-edge-base:bookworm
builder=localhost/iomt-edge-builder:bookworm
image=localhost/iomt-edge:image-test
name=iomt-edge-image-test
volume=iomt-edge-image-test-data
podman_log="$cache/podman.log"
: >"$podman_log"
work=""
cleanup() {
  podman rm -f -t 0 "$name" "$name-2" >/dev/null 2>&1 || true
  podman volume rm -f "$volume" >/dev/null 2>&1 || true
  # Each rebuild leaves the previous image's layers untagged.
  podman image prune -f >/dev/null 2>&1 || true
  [ -z "$work" ] || rm -rf "$work"
}
cleanup
work=$(mktemp -d)
trap cleanup EXIT

# The runtime base: Debian 12 minbase, as debian:bookworm-slim is (no docs, man pages or
# locales).
if ! podman image exists "$base"; then
  step "debootstrap bookworm into $cache/rootfs"
  rm -rf "$cache/rootfs.tmp"
  debootstrap --variant=minbase bookworm "$cache/rootfs.tmp" http://deb.debian.org/debian \
    >"$cache/debootstrap.log" 2>&1 || fail "debootstrap (log: $cache/debootstrap.log)"
  rm -rf "$cache/rootfs.tmp"/var/cache/apt/archives/*.deb "$cache/rootfs.tmp"/var/lib/apt/lists/* \
    "$cache/rootfs.tmp"/usr/share/doc/* "$cache/rootfs.tmp"/usr/share/man/* \
    "$cache/rootfs.tmp"/usr/share/locale/* "$cache/rootfs.tmp"/usr/share/info/*
  tar -C "$cache/rootfs.tmp" -c . | podman import - "$base" >/dev/null 2>&1
  rm -rf "$cache/rootfs.tmp"
fi
# The builder base: the same plus a C compiler (ring's and sled's build scripts); the Rust
# toolchain is this machine's, mounted at build time.
if ! podman image exists "$builder"; then
  step "builder base image"
  podman build -t "$builder" -f - "$work" >"$cache/builder.log" 2>&1 <<EOF || fail "builder base (log: $cache/builder.log)"
FROM $base
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
fi

step "building deploy/Dockerfile"
toolchain=$(rustc --print sysroot)
podman build --format docker -f deploy/Dockerfile -t "$image" \
  --build-arg BUILDER_IMAGE="$builder" --build-arg RUNTIME_IMAGE="$base" \
  --build-arg CARGO_NET_OFFLINE=true --volume "${CARGO_HOME:-$HOME/.cargo}/registry:/usr/local/cargo/registry" \
  --volume "$toolchain:/usr/local/rust:ro" . >"$cache/build.log" 2>&1 ||
  fail "podman build (log: $cache/build.log): $(tail -20 "$cache/build.log")"
size=$(podman image inspect --format '{{.Size}}' "$image")
step "image built: $((size / 1000000)) MB"
[ "$(podman image inspect --format '{{.Config.User}}' "$image")" = iomt ] || fail "the image does not run as user iomt"
podman image inspect --format '{{json .Config.Healthcheck}}' "$image" | grep -q healthcheck ||
  fail "the image has no HEALTHCHECK"

# The baked pipeline is the ward's, whose clock window would keep a recording's old device
# times out of alarms: the demo pipeline on the container's interfaces replaces it by a mount,
# as a user overrides it.
sed 's/"127\.0\.0\.1:\([0-9]*\)"/"0.0.0.0:\1"/' pipelines/ward-demo.toml >"$work/pipeline.toml"
chmod 0644 "$work/pipeline.toml"
podman volume create "$volume" >/dev/null

run() { # NAME: the service on the volume, read-only root, every port on a random loopback port
  # --health-interval=disable: podman's timer for the HEALTHCHECK needs systemd; the image's
  # HEALTHCHECK is run by `podman healthcheck run` below. podman still complains about the
  # timer without systemd: its stderr goes to $podman_log.
  podman run -d --name "$1" --read-only --stop-timeout 20 --health-interval=disable \
    -v "$volume:/var/lib/iomt-edge" -v "$work/pipeline.toml:/etc/iomt-edge/pipeline.toml:ro" \
    -p 127.0.0.1::1883 -p 127.0.0.1::1884 -p 127.0.0.1::8083 -p 127.0.0.1::9100 "$image" \
    >/dev/null 2>>"$podman_log"
}
host_port() { podman port "$1" "$2/tcp" | head -1 | sed 's/.*://'; }
wait_healthy() { # NAME: the image's own HEALTHCHECK, run by podman until it passes
  for _ in $(seq 1 60); do
    if podman healthcheck run "$1" >/dev/null 2>&1; then return 0; fi
    [ "$(podman inspect --format '{{.State.Running}}' "$1")" = true ] || fail "$1 exited"
    sleep 1
  done
  fail "$1 never became healthy"
}
metric() { # HTTP_PORT NAME: a sample's value
  curl -sf "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}
# Bed 3 of the demo ward raises these (fixtures/README.md); the alarms are retained.
expected="hr-high news2-urgent rr-high spo2-low sys-low temp-high"
active_alarms() { # MQTT_PORT: bed 3's active alarms, sorted, one line
  mosquitto_sub -h 127.0.0.1 -p "$1" -t 'alarms/ward/ward4-bed3/+' -v --retained-only -W 5 2>/dev/null |
    grep '"state":"active"' | awk '{ split($1, t, "/"); print t[4] }' | sort | tr '\n' ' ' | sed 's/ $//' || true
}

step "run 1: start"
run "$name"
[ "$(podman inspect --format '{{.Config.User}}' "$name")" = iomt ] || fail "not running as iomt"
wait_healthy "$name"
mqtt=$(host_port "$name" 1883)
http=$(host_port "$name" 9100)
step "healthy: MQTT on 127.0.0.1:$mqtt, HTTP on 127.0.0.1:$http"
curl -sf "http://127.0.0.1:$http/healthz" | grep -q '"status":"ok"' || fail "/healthz not ok"

step "replaying fixtures/ward-demo.jsonl"
podman run --rm --no-healthcheck --network host -v "$PWD/fixtures:/fixtures:ro" --entrypoint /usr/local/bin/iomt-edge \
  "$image" replay /fixtures/ward-demo.jsonl --broker "mqtt://127.0.0.1:$mqtt" --speed max ||
  fail "replay"
# Every message was acknowledged, so stored: its readings are counted now.
stored=$(metric "$http" iomt_readings_stored_total)
[ "${stored:-0}" -gt 0 ] || fail "no readings stored (iomt_readings_stored_total = ${stored:-missing})"
alarms=""
for _ in $(seq 1 10); do
  alarms=$(active_alarms "$mqtt")
  [ "$alarms" = "$expected" ] && break
  sleep 1
done
[ "$alarms" = "$expected" ] || fail "bed 3's alarms: '$alarms', expected '$expected'"
step "stored $stored readings; bed 3's alarms active on MQTT: $alarms"

step "podman stop (SIGTERM)"
podman stop -t 20 "$name" >/dev/null 2>>"$podman_log"
code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
podman logs "$name" 2>&1 | grep -q "stopped cleanly" || fail "no 'stopped cleanly' in its log"
drained=$(podman logs "$name" 2>&1 | grep "stopped cleanly" | sed -n 's/.*readings=\([0-9]*\).*/\1/p')
step "exit 0, drained (its log: stopped cleanly, readings=$drained)"
podman rm "$name" >/dev/null 2>>"$podman_log"

step "run 2: a new container on the same volume"
run "$name-2"
wait_healthy "$name-2"
mqtt=$(host_port "$name-2" 1883)
alarms=$(active_alarms "$mqtt")
[ "$alarms" = "$expected" ] || fail "after the restart bed 3's alarms: '$alarms', expected '$expected'"
podman stop -t 20 "$name-2" >/dev/null 2>>"$podman_log"
[ "$(podman inspect --format '{{.State.ExitCode}}' "$name-2")" = 0 ] || fail "second run: exit code not 0"
podman rm "$name-2" >/dev/null 2>>"$podman_log"
podman run --rm --no-healthcheck --read-only -v "$volume:/var/lib/iomt-edge" "$image" verify --data /var/lib/iomt-edge \
  >"$work/verify.txt" 2>&1 || fail "verify: $(cat "$work/verify.txt")"
dumped=$(podman run --rm --no-healthcheck --read-only -v "$volume:/var/lib/iomt-edge" "$image" \
  dump --data /var/lib/iomt-edge --site ward | wc -l)
[ "$dumped" = "$stored" ] || fail "the volume holds $dumped readings, $stored were stored"
step "the volume holds all $dumped readings (verify: ok) and the alarms (active again: $alarms)"
echo "image-test: passed in $(($(date +%s) - start)) s; image $((size / 1000000)) MB"
