#!/usr/bin/env bash
# Runs agentrun on a real Kubernetes cluster made with kind, then the e2e suite against it.
# Needs Docker and kind: it cannot run on machines without them (the build machines of this
# project have neither; their e2e runs use kube-sim instead).
#
#   scripts/e2e-kind.sh [--cluster NAME] [--delete] [--skip-build] [--no-suite] [--keep-chart]
#                       [-- NEXTEST ARGS...]
#
# See usage() below, or run it with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/e2e-kind.sh [options] [-- cargo-nextest arguments]

Builds the agentrun images with Docker from docker/Dockerfile, tagged as the Helm chart names
them (ghcr.io/agentrun/agentrun-{operator,sidecar,relay}:<workspace version>), creates a kind
cluster (or reuses one), loads the images into it with `kind load docker-image`, installs the
chart (release agentrun-kind in namespace agentrun-kind, watching only the namespace
agentrun-smoke, which enforces Pod Security "restricted"), checks that a run that sets
securityContext.runAsNonRoot succeeds there and that one that does not is reported as refused
(phase Failed, reason PodSecurity), removes the chart again, and then runs the e2e suite
(cargo nextest run -p agentrun-e2e) against the cluster with E2E_KUBECONFIG,
E2E_SIDECAR_IMAGE and E2E_HOST_ADDRESS set (see e2e/README.md).

Requirements: Docker (a running daemon), kind, kubectl, helm, cargo with cargo-nextest, and
redis-server (the suite starts Redis on this machine; the cluster's pods reach it through the
kind network's gateway). Without Docker and kind this script cannot run: it says which one is
missing and exits with status 2.

Options:
  --cluster NAME   kind cluster to create or reuse (default: agentrun-e2e)
  --delete         delete the kind cluster at the end (default: keep it for the next run)
  --skip-build     use the images already built by an earlier run
  --no-suite       stop after the chart's smoke test
  --keep-chart     leave the chart and the smoke namespace installed
  -h, --help       show this help
EOF
}

cluster=agentrun-e2e
delete_cluster=0
build=1
suite=1
keep_chart=0
nextest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) cluster="${2:?--cluster needs a name}"; shift 2 ;;
    --delete) delete_cluster=1; shift ;;
    --skip-build) build=0; shift ;;
    --no-suite) suite=0; shift ;;
    --keep-chart) keep_chart=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; nextest_args=("$@"); break ;;
    *) echo "e2e-kind: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

for tool in docker kind kubectl helm cargo; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "e2e-kind: $tool is not installed; this script needs Docker, kind, kubectl, helm and cargo (see --help)" >&2
    exit 2
  fi
done
if ! docker info >/dev/null 2>&1; then
  echo "e2e-kind: the Docker daemon is not reachable (docker info failed); start it and try again" >&2
  exit 2
fi
if [ "$suite" = 1 ] && ! cargo nextest --version >/dev/null 2>&1; then
  echo "e2e-kind: cargo-nextest is not installed (cargo install cargo-nextest), or pass --no-suite" >&2
  exit 2
fi

# The image tag is the workspace version, which is the chart's appVersion.
version="$(awk '/^\[workspace.package\]/ {p = 1; next} /^\[/ {p = 0} p && $1 == "version" {gsub(/"/, "", $3); print $3; exit}' Cargo.toml)"
if [ -z "$version" ]; then
  echo "e2e-kind: could not read [workspace.package] version from Cargo.toml" >&2
  exit 1
fi
registry=ghcr.io/agentrun
images=()
for target in operator sidecar relay; do
  images+=("$registry/agentrun-$target:$version")
done
sidecar_image="$registry/agentrun-sidecar:$version"

work="$(mktemp -d)"
cleanup() {
  if [ "$delete_cluster" = 1 ]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

if [ "$build" = 1 ]; then
  for target in operator sidecar relay; do
    echo "==> docker build --target $target -t $registry/agentrun-$target:$version"
    docker build -f docker/Dockerfile --target "$target" -t "$registry/agentrun-$target:$version" .
  done
fi

if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "==> kind create cluster --name $cluster"
  kind create cluster --name "$cluster" --wait 180s
fi
kubeconfig="$work/kubeconfig"
kind get kubeconfig --name "$cluster" > "$kubeconfig"
export KUBECONFIG="$kubeconfig"
kubectl version

for image in "${images[@]}"; do
  echo "==> kind load docker-image $image"
  kind load docker-image --name "$cluster" "$image"
done

smoke=agentrun-smoke
release=agentrun-kind
echo "==> helm install $release (watching namespace $smoke, Pod Security restricted)"
kubectl apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $smoke
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
EOF
helm upgrade --install "$release" helm/agentrun --namespace "$release" --create-namespace \
  --set operator.watchNamespace="$smoke" --set image.pullPolicy=IfNotPresent \
  --wait --timeout 5m

run() {
  local name="$1" security="$2"
  kubectl apply -n "$smoke" -f - <<EOF
apiVersion: agentrun.dev/v1alpha1
kind: AgentRun
metadata:
  name: $name
spec:
  image: busybox:1.36
  command: ["sh", "-c"]
  args: ["echo hello from a restricted namespace"]
$security
EOF
}
phase_is() {
  kubectl wait -n "$smoke" "agentrun/$1" --for=jsonpath='{.status.phase}'="$2" --timeout=300s
}
echo "==> a run that sets runAsNonRoot succeeds under Pod Security restricted"
run restricted-ok "  securityContext: {runAsNonRoot: true, runAsUser: 1000}"
if ! phase_is restricted-ok Succeeded; then
  kubectl get agentrun -n "$smoke" restricted-ok -o yaml >&2
  kubectl logs -n "$release" "deployment/$release-operator" --tail=50 >&2 || true
  exit 1
fi
echo "==> a run that does not is refused, and the refusal is in its status"
run restricted-refused ""
phase_is restricted-refused Failed
reason="$(kubectl get agentrun -n "$smoke" restricted-refused -o jsonpath='{.status.conditions[?(@.type=="PodsCreated")].reason}')"
if [ "$reason" != PodSecurity ]; then
  echo "e2e-kind: expected the PodsCreated condition to say PodSecurity, got '$reason'" >&2
  kubectl get agentrun -n "$smoke" restricted-refused -o yaml >&2
  exit 1
fi
kubectl get events -n "$smoke" --field-selector reason=PodSecurity -o name | grep -q . \
  || { echo "e2e-kind: no PodSecurity Warning event" >&2; exit 1; }

if [ "$keep_chart" = 0 ]; then
  echo "==> removing the chart (the suite runs its own operator on this machine)"
  kubectl delete agentrun -n "$smoke" --all --wait=true
  helm uninstall "$release" --namespace "$release" --wait
  kubectl delete namespace "$smoke" "$release" --wait=true
fi

if [ "$suite" = 1 ]; then
  # Pods reach this machine (Redis, which the suite starts) through the kind network's gateway.
  host_address="$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' \
    | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' | head -n 1)"
  if [ -z "$host_address" ]; then
    echo "e2e-kind: could not find the IPv4 gateway of the docker network 'kind'" >&2
    exit 1
  fi
  echo "==> cargo nextest run -p agentrun-e2e (E2E_HOST_ADDRESS=$host_address)"
  E2E_KUBECONFIG="$kubeconfig" E2E_SIDECAR_IMAGE="$sidecar_image" E2E_HOST_ADDRESS="$host_address" \
    cargo nextest run -p agentrun-e2e "${nextest_args[@]}"
fi
echo "e2e-kind: passed on kind cluster $cluster"
