#!/usr/bin/env bash
# Container smoke test: build the image, bring the compose service up from nothing, wait for
# /ready (the image serves its baked MNIST model at once), run the image's healthcheck, check that
# /model serves the shipped artifact, draw samples, and tear everything down again.
#
# Run from the repository root, as root, on a machine with ../shared (CI does):
#   bash scripts/container-smoke.sh
# Settings: VAE_PORT (host port; default the first free one from 18000), SMOKE_READY_TIMEOUT
# (seconds to wait for /ready; default 120).
set -euo pipefail

root=$(pwd)
shared=$(cd "$root/../shared" && pwd)
image=vae-service  # the tag docker-compose.yml runs
ready_timeout=${SMOKE_READY_TIMEOUT:-120}
# A unique project name keeps parallel or leftover runs from sharing containers and volumes.
project="vae-smoke-$$"
log() { printf '[container-smoke] %s\n' "$*" >&2; }
t0=$SECONDS

# The engine and the stand-in base image; every step is skipped when already done.
bash "$shared/tools/container-engine.sh"

# The first free port from 18000 up, unless the caller chose one.
if [ -z "${VAE_PORT:-}" ]; then
  VAE_PORT=$(python3 - <<'PY'
import socket
for port in range(18000, 18100):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
else:
    raise SystemExit("no free port in 18000-18099")
PY
)
fi
export VAE_PORT
# Compose builds with the same (local) torch source if it ever has to build.
export TORCH_INDEX_URL=
base="http://127.0.0.1:$VAE_PORT"

compose() { podman-compose -p "$project" -f "$root/docker-compose.yml" "$@"; }
teardown() {
  local rc=$?
  log "tearing down project $project"
  compose down -v >/dev/null 2>&1 || log "compose down failed (rc=$?)"
  exit "$rc"
}
trap teardown EXIT

# An empty TORCH_INDEX_URL makes pip take torch from the machine's local wheel (find-links).
t=$SECONDS
log "building $image"
# Docker format, because the OCI format drops the HEALTHCHECK instruction.
podman build --format docker --build-arg TORCH_INDEX_URL= -t "$image" "$root"
build_s=$((SECONDS - t))
log "build took ${build_s}s"

t=$SECONDS
log "starting project $project on port $VAE_PORT"
compose up -d
container=$(podman ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}' | head -n1)
[ -n "$container" ] || { log "no container found for project $project"; exit 1; }

# GET $1; prints the HTTP status, or 000 while nothing answers yet.
http_status() {
  python3 - "$1" <<'PY'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}

log "waiting up to ${ready_timeout}s for $base/ready"
deadline=$((SECONDS + ready_timeout))
status=000
while :; do
  status=$(http_status "$base/ready")
  [ "$status" = 200 ] && break
  state=$(podman inspect --format '{{.State.Status}}' "$container" 2>/dev/null || echo gone)
  if [ "$state" != running ] && [ "$state" != created ] && [ "$state" != configured ]; then
    log "container $container is $state"
    podman logs "$container" 2>&1 | tail -n 80 || true
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    log "/ready still answers $status after ${ready_timeout}s; container logs:"
    podman logs "$container" 2>&1 | tail -n 80 || true
    exit 1
  fi
  sleep 3
done
ready_s=$((SECONDS - t))
log "ready after ${ready_s}s; the container's last log lines:"
podman logs --tail 8 "$container" 2>&1 | sed 's/^/  | /' >&2

# Podman does not schedule healthchecks here, so run the image's one by hand.
if ! podman healthcheck run "$container"; then
  log "healthcheck failed for $container"
  podman inspect --format '{{json .State.Health}}' "$container" || true
  exit 1
fi

health=$(http_status "$base/health")
[ "$health" = 200 ] || { log "/health answered $health"; exit 1; }

# The image serves the repository's shipped model, byte for byte.
served=$(python3 -c 'import json, sys, urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1], timeout=10))["sha256"])' "$base/model")
shipped=$(sha256sum "$root/models/default/vae.pt" | cut -d' ' -f1)
[ "$served" = "$shipped" ] || { log "/model serves $served, the shipped model is $shipped"; exit 1; }

sample=$(python3 - "$base/sample" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(
    sys.argv[1],
    data=json.dumps({"n": 4, "seed": 0}).encode(),
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(req, timeout=30) as r:
    body = json.load(r)
outputs, latents = body["outputs"], body["latents"]
assert len(outputs) == 4, f"expected 4 outputs, got {len(outputs)}"
assert len(latents) == 4, f"expected 4 latents, got {len(latents)}"
assert all(len(o) == len(outputs[0]) > 0 for o in outputs), "ragged or empty outputs"
print(f"4 samples, latent_dim={len(latents[0])}, output_dim={len(outputs[0])}")
PY
)

echo "container smoke: OK ($sample; build ${build_s}s, first ready ${ready_s}s, total $((SECONDS - t0))s, port $VAE_PORT)"
