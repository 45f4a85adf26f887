#!/usr/bin/env bash
# Build, run and play maskserve's image without a Docker daemon, with Debian's buildah and podman. The container
# test (tests/container/) runs exactly these commands; docs/production.md shows them to users.
#
#   scripts/container.sh deps     apt-get the tools (buildah podman debootstrap fuse-overlayfs uidmap runc)
#   scripts/container.sh build    a Debian base made with debootstrap, then the project's Dockerfile on it
#   scripts/container.sh run [podman run options]    the image, detached, on the host network, port $PORT
#   scripts/container.sh wait     until /ready answers 200 (prints the container log if it never does)
#   scripts/container.sh stop     SIGTERM: in-flight requests drain, the server exits 0
#   scripts/container.sh play     podman kube play: the ConfigMap, Secret, Deployment and Service of deploy/kubernetes
#   scripts/container.sh down     podman kube down
#   scripts/container.sh clean    remove every container, pod and image made here, and their storage
#   scripts/container.sh podman ARGS...   podman with this script's configuration (e.g. `podman logs maskserve`)
#
# Everything podman and buildah store lives under $MASKSERVE_CONTAINER_STATE (its own containers.conf and
# storage.conf: runc, cgroupfs, ulimits within a sandbox's limits, overlay storage); what is slow to fetch and
# never changes (the debootstrap'd base rootfs, torch's wheel) is cached under $MASKSERVE_CONTAINER_CACHE and
# survives `clean`. Needs root (debootstrap, chroot, rootful podman).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MASKSERVE_CONTAINER_CACHE:-$HOME/.cache/maskserve-container}
STATE=${MASKSERVE_CONTAINER_STATE:-$HOME/.local/share/maskserve-container}
IMAGE=${MASKSERVE_IMAGE:-localhost/maskserve:0.1.0}
BASE_IMAGE=${MASKSERVE_BASE_IMAGE:-localhost/maskserve-base:bookworm}
NAME=${MASKSERVE_CONTAINER_NAME:-maskserve}
PORT=${MASKSERVE_CONTAINER_PORT:-8000}
MODEL_CACHE=${MASKSERVE_MODEL_CACHE:-$STATE/model-cache}
# The Secret's key for `play` (the manifest ships a placeholder; never commit a real one).
API_KEY=${MASKSERVE_API_KEY:-}
SUITE=bookworm # Debian 12: Python 3.11, the version the project pins for its images
TORCH_VERSION=2.13.0
# The pip index inside the build. The Dockerfile's default, PyTorch's CPU index, is not reachable everywhere
# (nor needed: torch's wheel comes from the cache); PyPI serves torch's dependencies and the project's.
TORCH_INDEX_URL=${MASKSERVE_TORCH_INDEX_URL:-https://pypi.org/simple}
# The Deployment's image, pointed at the local build; the Deployment is played as it is otherwise.
# The Secret is not in the played file: podman 4.3's kube play stores a Secret as YAML and then fails to read it
# back ("not valid JSON"), so `play` stores it itself (`podman secret create`) in the form envFrom reads.
MANIFESTS=(configmap deployment service)

log() { printf '[container.sh] %s\n' "$*" >&2; }

configure() {
  # Private configuration and storage: nothing here touches another user's podman.
  mkdir -p "$STATE"
  cat >"$STATE/containers.conf" <<EOF
[containers]
# podman's default ulimits exceed what a sandboxed machine may grant
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
# crun fails on some cgroup layouts; runc works on all we met. No systemd: cgroupfs and file events.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$STATE/tmp"
[network]
network_config_dir = "$STATE/networks"
EOF
  cat >"$STATE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$STATE/run"
EOF
  export CONTAINERS_CONF="$STATE/containers.conf" CONTAINERS_STORAGE_CONF="$STATE/storage.conf"
}

pod() { podman "$@"; }

deps() {
  local missing=()
  for tool in buildah podman debootstrap fuse-overlayfs newuidmap runc; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    log "installing buildah podman debootstrap fuse-overlayfs uidmap runc (missing: ${missing[*]})"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah podman debootstrap fuse-overlayfs uidmap runc >/dev/null
  fi
}

mirror() {
  # The Debian mirror apt already uses on this host (deb822 or one-line sources), else Debian's CDN.
  local uri
  uri=$(grep -hs -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true)
  [[ -n $uri ]] || uri=$(grep -hs -m1 -E '^deb ' /etc/apt/sources.list | awk '{print $2}' || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

base_tarball() {
  # A minimal Debian with Python 3.11, trusting the host's extra CA certificates (a TLS-inspecting egress proxy
  # signs with one: pip in the build must trust it as the host's pip does). Cached by those certificates' hash.
  local certs hash tarball rootfs
  certs=$(find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | sort)
  hash=$(cat /dev/null $certs | sha256sum | cut -c1-12)
  tarball="$CACHE/base-$SUITE-$hash.tar"
  if [[ ! -f $tarball ]]; then
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    log "debootstrap $SUITE into $rootfs (a few minutes, once)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      "$SUITE" "$rootfs" "$(mirror)" >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; exit 1; }
    if [[ -n $certs ]]; then
      # shellcheck disable=SC2086
      cp $certs "$rootfs/usr/local/share/ca-certificates/"
    fi
    chroot "$rootfs" update-ca-certificates >/dev/null
    # pip vendors certifi's bundle: point it at the system one, which now holds the host's certificates.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    # PEP 668 marker: the build installs into its own virtual environment, but ensurepip runs first.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs" "$rootfs.log"
  fi
  echo "$tarball"
}

torch_wheels() {
  # torch's CPU wheel from wherever the host's pip finds it (a local wheel directory here), never a CUDA build.
  local dir="$CACHE/wheels" py
  mkdir -p "$dir"
  if ! compgen -G "$dir/torch-$TORCH_VERSION*.whl" >/dev/null; then
    py=python3
    [[ -x $ROOT/.venv/bin/python ]] && py=$ROOT/.venv/bin/python
    log "pip download torch==$TORCH_VERSION"
    "$py" -m pip download -q --no-deps "torch==$TORCH_VERSION" -d "$dir" 2>&1 | grep -v '^WARNING: Location' >&2 || true
    compgen -G "$dir/torch-$TORCH_VERSION*.whl" >/dev/null || { log "no torch $TORCH_VERSION wheel"; exit 1; }
  fi
  echo "$dir"
}

build() {
  configure
  local tarball wheels
  tarball=$(base_tarball)
  if ! pod image exists "$BASE_IMAGE"; then
    pod import --quiet "$tarball" "$BASE_IMAGE" >/dev/null
  fi
  wheels=$(torch_wheels)
  # --format docker: the OCI format drops HEALTHCHECK. chroot isolation: no nested namespaces needed.
  log "buildah bud $IMAGE"
  buildah bud --isolation chroot --format docker --pull=never \
    --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    --build-context "wheels=$wheels" -t "$IMAGE" "$ROOT"
}

run() {
  configure
  mkdir -p "$MODEL_CACHE"
  chown 10001:10001 "$MODEL_CACHE" # the image's user; the first start de-quantizes the bundled model here
  # --read-only as the Deployment's readOnlyRootFilesystem (podman adds a tmpfs /tmp); --stop-timeout above
  # MASKSERVE_SHUTDOWN_TIMEOUT_S so `stop` lets requests drain before any SIGKILL.
  pod run -d --name "$NAME" --network host --read-only --stop-timeout 45 \
    -e "MASKSERVE_PORT=$PORT" -e MASKSERVE_HOST=127.0.0.1 \
    -v "$MODEL_CACHE:/var/cache/maskserve" "$@" "$IMAGE"
}

wait_ready() {
  local timeout=${1:-300} url="http://127.0.0.1:$PORT/ready" t=0
  configure
  until python3 -c "import urllib.request as u; u.urlopen('$url', timeout=3)" 2>/dev/null; do
    if ((t >= timeout)); then
      log "$url not ready after ${timeout}s"
      pod logs --tail 40 "$NAME" >&2 || true
      exit 1
    fi
    sleep 2
    t=$((t + 2))
  done
  log "$url ready after ~${t}s"
}

stop() {
  configure
  pod stop --time 45 "$NAME" >/dev/null
  pod inspect --format '{{.State.ExitCode}}' "$NAME"
}

manifest() {
  # One multi-document file from the manifests as they are, with local choices applied: the local image, the
  # port (host network: 8000 may be taken) and one replica (on the host network a second cannot bind it).
  local out="$STATE/kube.yaml" name
  mkdir -p "$STATE"
  : >"$out"
  for name in "${MANIFESTS[@]}"; do
    printf -- '---\n' >>"$out"
    cat "$ROOT/deploy/kubernetes/$name.yaml" >>"$out"
  done
  # podman (4.3) turns a containerPort into a port mapping, which host networking refuses: the container's
  # ports list goes, and the probes name the port by number instead of by its name.
  sed -i -e "s|image: maskserve:0.1.0|image: $IMAGE|" \
    -e "s|MASKSERVE_PORT: \"8000\"|MASKSERVE_PORT: \"$PORT\"|" -e "s|^  replicas: 2$|  replicas: 1|" \
    -e '/^          ports:$/,/^              protocol: TCP$/d' \
    -e "s|^              port: http$|              port: $PORT|" "$out"
  echo "$out"
}

secret_json() {
  # deploy/kubernetes/secret.yaml's values (the key from $MASKSERVE_API_KEY if set) as podman 4.3 reads a Secret
  # for envFrom: a JSON object of name -> base64 value, i.e. the Secret's `data`.
  local py=python3
  [[ -x $ROOT/.venv/bin/python ]] && py=$ROOT/.venv/bin/python
  API_KEY=$API_KEY "$py" - "$ROOT/deploy/kubernetes/secret.yaml" <<'PY'
import base64, json, os, sys, yaml
secret = yaml.safe_load(open(sys.argv[1]))
values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
values.update(secret.get("stringData", {}))
if os.environ["API_KEY"]:
    values["MASKSERVE_API_KEYS"] = os.environ["API_KEY"]
print(json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in values.items()}))
PY
}

play() {
  configure
  local name
  name=$(grep -m1 -E '^  name:' "$ROOT/deploy/kubernetes/secret.yaml" | awk '{print $2}')
  pod secret rm "$name" >/dev/null 2>&1 || true
  secret_json | pod secret create "$name" - >/dev/null
  pod kube play --network host "$(manifest)"
}

down() {
  configure
  local name
  name=$(grep -m1 -E '^  name:' "$ROOT/deploy/kubernetes/secret.yaml" | awk '{print $2}')
  pod kube down "$(manifest)"
  pod secret rm "$name" >/dev/null
}

clean() {
  configure
  if command -v podman >/dev/null 2>&1 && [[ -d $STATE/storage ]]; then
    pod pod rm --all --force >/dev/null 2>&1 || true
    pod rm --all --force >/dev/null 2>&1 || true
    pod volume rm --all --force >/dev/null 2>&1 || true
    pod secret rm --all >/dev/null 2>&1 || true
    pod rmi --all --force >/dev/null 2>&1 || true
    buildah rm --all >/dev/null 2>&1 || true
  fi
  rm -rf "$STATE"
  [[ ${1:-} == --all ]] && rm -rf "$CACHE"
  log "removed $STATE${1:+ and $CACHE}"
}

cmd=${1:-}
shift || true
case $cmd in
  deps) deps ;;
  build) build ;;
  run) run "$@" ;;
  wait) wait_ready "$@" ;;
  stop) stop ;;
  manifest) configure && manifest ;;
  play) play ;;
  down) down ;;
  clean) clean "$@" ;;
  podman) configure && pod "$@" ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
