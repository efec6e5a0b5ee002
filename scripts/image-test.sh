#!/usr/bin/env bash
# The container image, tested for real with podman: builds deploy/Dockerfile (the very file a
# user builds), makes its keys as README (Deploying) tells a user to (a CA and a server
# certificate with openssl, the HTTP token, an account per device of the demo ward and one for
# the nurses' station with the image's own `iomt-edge credentials add`), runs it as shipped with
# a data volume, the keys mounted read-only and its ports published on loopback, waits for its
# HEALTHCHECK (HTTPS), sees a plain and an anonymous MQTT client refused, replays the demo ward
# into it over MQTT/TLS (each device with its own account, all at once), sees bed 3's alarms on
# its MQTT port as the nurses' station and the readings in /metrics over HTTPS with the bearer
# token (401 without), stops it (graceful: exit 0, drained), runs a new container on the same
# volume and finds the alarms and every reading there (`iomt-edge verify` and `dump` in the
# image). scripts/test.sh runs it last; it takes about a minute once its caches are warm (README,
# Deploying; the first run on a machine debootstraps and compiles everything).
#
# No image registry is reachable from CI, so the base images are made here, once, into a cache
# outside the clone (${IOMT_IMAGE_CACHE:-/var/tmp/iomt-edge-image}): a minimal Debian 12
# (debootstrap, `podman import`) as the runtime image, and that plus gcc as the builder, into
# which this machine's Rust toolchain is mounted read-only, and its crate registry
# (~/.cargo/registry, which the tests' own build filled): the build takes its crates from there
# without the network. The Dockerfile's cache mount keeps the target between runs. Idempotent:
# containers and the volume it makes are removed before and after.
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

source scripts/need.sh
need podman podman runc runc debootstrap debootstrap mosquitto_sub mosquitto-clients curl curl \
  openssl openssl python3 python3
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
  # Rootless, the keys belong to the container's user inside podman's user namespace.
  [ -z "$work" ] || rm -rf "$work" 2>/dev/null || podman unshare rm -rf "$work"
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
podman image inspect --format '{{json .Config.Healthcheck}}' "$image" |
  grep -q '"healthcheck","--url","https://127.0.0.1:9100/healthz","--ca","/etc/iomt-edge/keys/ca.pem"' ||
  fail "the image has no HEALTHCHECK over HTTPS: $(podman image inspect --format '{{json .Config.Healthcheck}}' "$image")"

# The keys, as README (Deploying) makes them: the directory the image mounts read-only on
# /etc/iomt-edge/keys, owned by the container's user (uid 10001), private files mode 0600.
keys="$work/keys"      # mounted into the service
clients="$work/clients" # the devices' and the nurses' station's passwords
mkdir -p "$keys" "$clients" "$work/replay"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=iomt-edge image test CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout "$work/ca.key" -out "$keys/ca.pem" 2>/dev/null || fail "openssl: the CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=iomt-edge" \
  -keyout "$keys/server.key" -out "$work/server.csr" 2>/dev/null || fail "openssl: the key"
# IP:127.0.0.1: the image's HEALTHCHECK, and this test through the published ports.
openssl x509 -req -in "$work/server.csr" -CA "$keys/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -CAserial "$work/ca.srl" -days 2 -out "$keys/server.pem" \
  -extfile <(printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth") 2>/dev/null ||
  fail "openssl: the server certificate"
openssl rand -hex 32 >"$keys/http-token"
printf 'Authorization: Bearer %s\n' "$(cat "$keys/http-token")" >"$work/auth-header"

# The demo ward's devices, each with the account its route's source template names it by
# (deploy/pipeline.toml: the monitor on ward/4/bed/3/vitals is ward4-bed3-monitor), and its
# messages in a fixture of its own; device times moved to the last 13 minutes, so that the
# shipped pipeline's clock window (24 h) takes them and raises the alarms the recording does.
python3 - fixtures/ward-demo.jsonl deploy/pipeline.toml "$work/replay" <<'PY' >"$work/accounts" ||
import json, sys, time, tomllib
from pathlib import Path
fixture, pipeline, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
routes = tomllib.load(open(pipeline, "rb"))["route"]
def account(topic):
    levels = topic.split("/")
    for r in routes:
        f = r["topic"].split("/")
        if len(f) == len(levels) and all(a in ("+", b) for a, b in zip(f, levels)):
            s = r["source"]
            for i, level in enumerate(levels, 1):
                s = s.replace("{%d}" % i, level)
            return s
    sys.exit("no route takes " + topic)
lines = [json.loads(l) for l in open(fixture) if l.strip() and not l.startswith("//")]
shift = int(time.time() * 1000) - 13 * 60_000 - lines[0]["payload"]["ts"]
per = {}
for m in lines:
    p = m["payload"]
    if isinstance(p, dict):
        p["ts"] += shift
    else:
        for rec in p:
            if "bt" in rec:
                rec["bt"] += shift / 1000
    per.setdefault(account(m["topic"]), []).append(json.dumps(m))
for name, msgs in sorted(per.items()):
    (out / (name + ".jsonl")).write_text("\n".join(msgs) + "\n")
    print(name)
PY
  fail "splitting the fixture by device"
echo nurses-station >>"$work/accounts"
while read -r account; do
  openssl rand -hex 16 >"$clients/$account.password"
done <"$work/accounts"
nurse_password=$(cat "$clients/nurses-station.password")
chmod 0700 "$keys" "$clients"
chmod 0600 "$keys/server.key" "$keys/http-token" "$clients"/*
chmod 0644 "$keys/ca.pem" "$keys/server.pem"
if [ "$(id -u)" = 0 ]; then
  chown -R 10001:10001 "$keys" "$clients"
else
  podman unshare chown -R 10001:10001 "$keys" "$clients"
fi
# The accounts, made by the image's own command, as the container's user, into the keys
# directory (one container for all of them: its shell runs the command once per account).
podman run --rm --no-healthcheck --read-only -v "$keys:/etc/iomt-edge/keys" \
  -v "$clients:/clients:ro" --entrypoint /bin/sh "$image" -c '
  for f in /clients/*.password; do
    iomt-edge credentials add "$(basename "$f" .password)" --file /etc/iomt-edge/keys/credentials \
      --password-file "$f" 2>&1 || exit 1
  done' >"$work/credentials.log" || fail "credentials add: $(cat "$work/credentials.log")"
accounts=$(podman run --rm --no-healthcheck --read-only -v "$keys:/etc/iomt-edge/keys:ro" \
  "$image" credentials list --file /etc/iomt-edge/keys/credentials 2>/dev/null | grep -c . || true)
[ "$accounts" = "$(wc -l <"$work/accounts")" ] ||
  fail "the credentials file lists $accounts accounts, expected $(wc -l <"$work/accounts")"
if [ "$(id -u)" = 0 ]; then
  [ "$(stat -c '%u %a' "$keys/credentials")" = "10001 600" ] ||
    fail "credentials: owner and mode $(stat -c '%u %a' "$keys/credentials"), expected 10001 600"
fi
step "keys: a CA, a certificate for 127.0.0.1, the HTTP token, $(wc -l <"$work/accounts") accounts"
podman volume create "$volume" >/dev/null

run() { # NAME: the image as shipped, on the volume with the keys, read-only root, every port
  # on a random loopback port.
  # --health-interval=disable: podman's timer for the HEALTHCHECK needs systemd; the image's
  # HEALTHCHECK is run by `podman healthcheck run` below. podman still complains about the
  # timer without systemd: its stderr goes to $podman_log.
  podman run -d --name "$1" --read-only --stop-timeout 20 --health-interval=disable \
    -v "$volume:/var/lib/iomt-edge" -v "$keys:/etc/iomt-edge/keys:ro" \
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
https() { # PORT PATH [CURL ARGS]: the body, trusting the test's CA
  local port=$1 path=$2
  shift 2
  curl -sf --cacert "$keys/ca.pem" "$@" "https://127.0.0.1:$port$path"
}
metric() { # HTTP_PORT NAME: a sample's value, read with the token
  https "$1" /metrics -H @"$work/auth-header" | awk -v n="$2" '$1 == n { print $2 }'
}
# Bed 3 of the demo ward raises these (fixtures/README.md); the alarms are retained.
expected="hr-high news2-urgent rr-high spo2-low sys-low temp-high"
active_alarms() { # MQTT_PORT: bed 3's active alarms, sorted, one line: read over TLS as the
  # nurses' station
  mosquitto_sub -h 127.0.0.1 -p "$1" --cafile "$keys/ca.pem" -u nurses-station -P "$nurse_password" \
    -t 'alarms/ward/ward4-bed3/+' -v --retained-only -W 5 2>/dev/null |
    grep '"state":"active"' | awk '{ split($1, t, "/"); print t[4] }' | sort | tr '\n' ' ' | sed 's/ $//' || true
}

step "run 1: start"
run "$name"
[ "$(podman inspect --format '{{.Config.User}}' "$name")" = iomt ] || fail "not running as iomt"
wait_healthy "$name"
mqtt=$(host_port "$name" 1883)
http=$(host_port "$name" 9100)
step "healthy (HTTPS): MQTT on 127.0.0.1:$mqtt, HTTP on 127.0.0.1:$http"
https "$http" /healthz | grep -q '"status":"ok"' || fail "/healthz not ok over HTTPS"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$keys/ca.pem" "https://127.0.0.1:$http/metrics")
[ "$code" = 401 ] || fail "/metrics without the token answered $code, not 401"
[ "$(metric "$http" iomt_http_unauthorized_total)" = 1 ] || fail "the 401 was not counted"
curl -sf -o /dev/null "http://127.0.0.1:$http/healthz" && fail "plain HTTP answered"

# No way in without TLS and an account: a plain MQTT client gets no CONNACK, an anonymous one
# over TLS is refused.
mosquitto_sub -h 127.0.0.1 -p "$mqtt" -t '#' -C 1 -W 5 >"$work/plain.txt" 2>&1 &&
  fail "a plain MQTT client connected: $(cat "$work/plain.txt")"
mosquitto_sub -h 127.0.0.1 -p "$mqtt" --cafile "$keys/ca.pem" -t '#' -C 1 -W 5 >"$work/anon.txt" 2>&1 &&
  fail "an anonymous MQTT client connected: $(cat "$work/anon.txt")"
grep -qi 'not authori' "$work/anon.txt" || fail "anonymous client: $(cat "$work/anon.txt")"
for reason in tls anonymous; do
  n=$(metric "$http" "iomt_connections_refused_total{reason=\"$reason\"}")
  [ "${n:-0}" -ge 1 ] || fail "iomt_connections_refused_total{reason=\"$reason\"} = ${n:-missing}"
done
step "refused: plain HTTP, /metrics without the token (401), plain MQTT, anonymous MQTT"

step "replaying fixtures/ward-demo.jsonl over MQTT/TLS, $(($(wc -l <"$work/accounts") - 1)) devices at once"
# The image's own `replay`, once per device with its own account, all at once as a ward's
# devices publish.
podman run --rm --no-healthcheck --read-only --network host -v "$work/replay:/replay:ro" \
  -v "$clients:/clients:ro" -v "$keys/ca.pem:/ca.pem:ro" --entrypoint /bin/sh "$image" -c '
  pids=""
  for f in /replay/*.jsonl; do
    n=$(basename "$f" .jsonl)
    iomt-edge replay "$f" --broker mqtts://127.0.0.1:'"$mqtt"' --speed max --ca /ca.pem \
      --username "$n" --password-file "/clients/$n.password" &
    pids="$pids $!"
  done
  rc=0
  for p in $pids; do wait "$p" || rc=1; done
  exit $rc' >"$work/replay.log" 2>&1 || fail "replay: $(cat "$work/replay.log")"
sent=$(awk '/^replayed/ { n += $2 } END { print n }' "$work/replay.log")
[ "$sent" = "$(grep -c . fixtures/ward-demo.jsonl)" ] ||
  fail "replayed $sent messages of $(grep -c . fixtures/ward-demo.jsonl): $(cat "$work/replay.log")"
# Every message was acknowledged, so stored: its readings are counted now.
stored=$(metric "$http" iomt_readings_stored_total)
[ "${stored:-0}" -gt 0 ] || fail "no readings stored (iomt_readings_stored_total = ${stored:-missing})"
refused=$(metric "$http" 'iomt_publishes_refused_total{reason="impostor"}')
[ "$refused" = 0 ] || fail "$refused publishes refused as impostors: an account is misnamed"
alarms=""
for _ in $(seq 1 10); do
  alarms=$(active_alarms "$mqtt")
  [ "$alarms" = "$expected" ] && break
  sleep 1
done
[ "$alarms" = "$expected" ] || fail "bed 3's alarms: '$alarms', expected '$expected'"
step "$sent messages, $stored readings stored; bed 3's alarms active, read over TLS as the nurses' station: $alarms"

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
