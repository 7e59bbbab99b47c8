#!/usr/bin/env bash
# Checks the Helm chart and the plain manifests:
#   1. helm lint --strict with the default values and with every CI values file;
#   2. helm template of each, validated (with the CRD) against the Kubernetes 1.33/1.35 schemas
#      by kubernetes-validate --strict (unknown fields are errors);
#   3. manifests/examples/*.yaml validated against the AgentRun CRD's OpenAPI schema;
#   4. manifests/install.yaml equal to a fresh render (`--update` rewrites it);
#   5. what non-default values ask for is in the rendered objects (relay auth and CORS, Redis
#      TLS, external Redis (standalone, Cluster, Sentinel), relay replicas and their
#      PodDisruptionBudget, ingress, agent pod settings, OpenShift, watchNamespace, the
#      archiver and its store), and bad
#      values fail with a message naming the value;
#   6. the image names and tags agree across docker/Dockerfile, Cargo.toml, the chart,
#      manifests/install.yaml, docs/operator.md and scripts/e2e-kind.sh.
# Needs helm v4 and kubernetes-validate: scripts/deps/helm.sh installs both.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
chart="$root/helm/agentrun"
install="$root/manifests/install.yaml"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

render_install() {
  {
    cat <<'HEADER'
# agentrun plain install: rendered from helm/agentrun by scripts/check-chart.sh --update.
# Do not edit by hand. Before applying, create the bundled Redis password:
#   kubectl create namespace agentrun
#   kubectl -n agentrun create secret generic agentrun-redis-auth \
#     --from-literal=password="$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
# and the relay's bearer tokens (one per line, optionally followed by the namespaces it sees):
#   kubectl -n agentrun create secret generic agentrun-relay-tokens \
#     --from-literal=tokens="$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
#   kubectl apply --server-side -f manifests/install.yaml
HEADER
    helm template agentrun "$chart" --namespace agentrun --include-crds \
      --set redis.createSecret=false --set relay.auth.existingSecret=agentrun-relay-tokens
  }
}

if [ "${1:-}" = "--update" ]; then
  render_install > "$install"
  echo "wrote $install"
  exit 0
fi

for tool in helm kubernetes-validate python3; do
  command -v "$tool" >/dev/null || { echo "check-chart: $tool is missing; run scripts/deps/helm.sh" >&2; exit 1; }
done

fail=0
value_sets=(
  "default::"
  "external-redis::--set redis.bundled=false --set redis.external.url=rediss://redis.example.com:6380 --set redis.external.password=p"
  "existing-secret::--set redis.bundled=false --set redis.external.existingSecret=my-redis"
  "external-cluster::--set redis.bundled=false --set redis.external.url=redis+cluster://redis-0.redis:6379\\,redis-1.redis:6379\\,redis-2.redis:6379 --set redis.external.existingSecret=my-redis --set relay.replicas=2"
  "external-sentinel::--set redis.bundled=false --set redis.external.url=redis+sentinel://sentinel-0.sentinel:26379\\,sentinel-1.sentinel:26379/mymaster --set redis.external.password=p --set relay.replicas=3"
  "auth-token-secret::--set relay.auth.existingSecret=viewer-tokens"
  "auth-kubernetes::--set relay.auth.mode=kubernetes"
  "auth-none-cors::--set relay.auth.mode=none --set relay.cors.origins={https://a.example.com,https://b.example.com:8443}"
  "redis-tls-bundled::--set redis.tls.enabled=true --set redis.tls.caSecret=redis-ca --set redis.tls.caKey=bundle.pem --set redis.tls.serverCertSecret=redis-server --set redis.tls.clientCertSecret=redis-client"
  "redis-tls-external::--set redis.bundled=false --set redis.external.url=rediss://redis.example.com:6380 --set redis.external.existingSecret=my-redis --set redis.tls.enabled=true --set redis.tls.caSecret=redis-ca"
  "relay-tls::--set relay.tls.enabled=true --set relay.tls.secretName=relay-cert --set relay.ingress.enabled=true"
  "relay-tls-cert-manager::--set relay.tls.enabled=true --set relay.tls.certManager.enabled=true --set relay.tls.certManager.issuerRef.name=internal-ca --set relay.tls.certManager.issuerRef.kind=ClusterIssuer --set relay.tls.certManager.extraDnsNames={agentrun.example.com}"
  "relay-tls-cert-manager-public::--set relay.tls.enabled=true --set relay.tls.certManager.enabled=true --set relay.tls.certManager.issuerRef.name=letsencrypt --set relay.tls.certManager.issuerRef.kind=ClusterIssuer --set relay.tls.certManager.serviceNames=false --set relay.tls.certManager.extraDnsNames={agentrun.example.com}"
  "openshift::--set openshift=true"
  "private-quota::--set sidecar.imagePullSecrets[0].name=regcred --set sidecar.imagePullSecrets[1].name=mirror --set sidecar.resources.limits.cpu=200m --set sidecar.resources.limits.memory=128Mi --set agentPods.fsGroup=2000 --set sidecar.securityContext.runAsUser=1000 --set sidecar.durability=replicas=1\\,timeout=500"
  "archive-fs::--set archive.enabled=true"
  "archive-s3::--set archive.enabled=true --set archive.storeUrl=s3://agentrun-archive/runs --set archive.credentialsSecret=archive-creds --set archiver.replicas=2 --set archiver.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/a --set metrics.serviceMonitor.enabled=true --set redis.tls.enabled=true --set redis.tls.caSecret=redis-ca --set redis.tls.serverCertSecret=redis-server"
  "everything::--set relay.ingress.enabled=true --set relay.ingress.tlsSecretName=tls --set operator.replicas=2 --set relay.replicas=3 --set operator.podDisruptionBudget.enabled=true --set relay.podDisruptionBudget.enabled=true --set redis.persistence.enabled=false --set operator.watchNamespace=agents --set metrics.serviceMonitor.enabled=true"
)
for entry in "${value_sets[@]}"; do
  name="${entry%%::*}"
  args="${entry#*::}"
  echo "== $name"
  # shellcheck disable=SC2086
  helm lint --strict "$chart" $args >/dev/null || { echo "helm lint failed for $name" >&2; helm lint --strict "$chart" $args; fail=1; }
  # shellcheck disable=SC2086
  helm template agentrun "$chart" --namespace agentrun --include-crds $args > "$work/$name.yaml"
  # ServiceMonitor is a Prometheus Operator CRD: not in the Kubernetes schemas, checked by structure below.
  python3 - "$work/$name.yaml" "$work/$name-core.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core, monitors = [], []
for d in docs:
    (monitors if d.get("kind") == "ServiceMonitor" else core).append(d)
# cert-manager's Certificate: not in the Kubernetes schemas either, checked by structure.
certificates = [d for d in core if d.get("kind") == "Certificate"]
core = [d for d in core if d.get("kind") != "Certificate"]
for c in certificates:
    assert c["apiVersion"] == "cert-manager.io/v1", c
    assert c["spec"]["secretName"] and c["spec"]["dnsNames"] and c["spec"]["issuerRef"]["name"], c
for m in monitors:
    assert m["apiVersion"] == "monitoring.coreos.com/v1", m
    assert m["spec"]["endpoints"][0]["port"] == "http", m
    assert m["spec"]["selector"]["matchLabels"], m
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
PY
  python3 "$root/scripts/check-chart-values.py" "$name" "$work/$name.yaml" || { echo "the rendered objects ($name) do not do what the values ask" >&2; fail=1; }
  for version in 1.33.0 1.35.0; do
    if ! out="$(kubernetes-validate --strict --quiet -k "$version" "$work/$name-core.yaml" 2>&1)"; then
      echo "$out" >&2
      echo "rendered manifests ($name) do not validate against Kubernetes $version" >&2
      fail=1
    fi
  done
done

echo "== bad values are refused with a message naming them"
bad_values=(
  "redis.tls.serverCertSecret::--set redis.tls.enabled=true --set redis.tls.caSecret=ca"
  "redis.tls.caSecret::--set redis.tls.enabled=true --set redis.tls.serverCertSecret=srv"
  "is not a rediss://::--set redis.bundled=false --set redis.external.url=redis://r:6379 --set redis.tls.enabled=true"
  "/relay/auth/mode::--set relay.auth.mode=open"
  "/relay/cors/origins/0::--set relay.cors.origins={https://a.example.com/path}"
  "/redis/tls/caSecret::--set redis.tls.caSecret=Not_A_Name"
  "/sidecar/securityContext::--set sidecar.securityContext.runAsNonroot=true"
  "/agentPods/fsGroup::--set agentPods.fsGroup=-1"
  "/redis/maxmemory::--set redis.maxmemory=lots"
  "/redis/maxmemoryPolicy::--set redis.maxmemoryPolicy=evict-everything"
  "/sidecar/durability::--set sidecar.durability=always"
  "/sidecar/durability::--set sidecar.durability=replicas=0"
  "set sidecar.durability=none::--set redis.bundled=false --set redis.external.url=redis+cluster://a:6379 --set redis.external.password=p --set sidecar.durability=aof"
  "/sidecar/imagePullSecrets/0::--set sidecar.imagePullSecrets[0].nam=regcred"
  "/archive/storeUrl::--set archive.enabled=true --set archive.storeUrl=ftp://host/x"
  "archive.persistence.accessMode::--set archive.enabled=true --set archiver.replicas=2"
  "/archiver/replicas::--set archive.enabled=true --set archiver.replicas=0"
  "relay.tls.certManager.issuerRef.name::--set relay.tls.enabled=true --set relay.tls.certManager.enabled=true"
  "needs relay.tls.enabled=true::--set relay.tls.certManager.enabled=true --set relay.tls.certManager.issuerRef.name=ca"
  "the certificate would name nothing::--set relay.tls.enabled=true --set relay.tls.certManager.enabled=true --set relay.tls.certManager.issuerRef.name=ca --set relay.tls.certManager.serviceNames=false"
  "/relay/tls/certManager/issuerRef/kind::--set relay.tls.enabled=true --set relay.tls.certManager.enabled=true --set relay.tls.certManager.issuerRef.name=ca --set relay.tls.certManager.issuerRef.kind=Vault"
)
for entry in "${bad_values[@]}"; do
  want="${entry%%::*}"
  args="${entry#*::}"
  # shellcheck disable=SC2086
  if out="$(helm template agentrun "$chart" --namespace agentrun $args 2>&1)"; then
    echo "helm template accepted bad values ($args)" >&2
    fail=1
  elif [[ "$out" != *"$want"* ]]; then
    echo "$out" >&2
    echo "helm template refused ($args) without naming $want" >&2
    fail=1
  fi
done

echo "== CRD and examples"
for version in 1.33.0 1.35.0; do
  kubernetes-validate --strict --quiet -k "$version" "$root/crds/agentrun.dev_agentruns.yaml" || { echo "the CRD does not validate against Kubernetes $version" >&2; fail=1; }
done
python3 - "$root/crds/agentrun.dev_agentruns.yaml" "$root"/manifests/examples/*.yaml <<'PY' || fail=1
import sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

def to_json_schema(s):
    """OpenAPI v3 (Kubernetes flavour) to JSON Schema: drop the x-kubernetes-* and nullable keys."""
    if isinstance(s, dict):
        out = {k: to_json_schema(v) for k, v in s.items() if not k.startswith("x-kubernetes") and k != "nullable"}
        if s.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if s.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(s, list):
        return [to_json_schema(v) for v in s]
    return s

js = to_json_schema(schema)
js["properties"]["metadata"] = {"type": "object"}
js["properties"]["apiVersion"] = {"const": "agentrun.dev/v1alpha1"}
js["properties"]["kind"] = {"const": "AgentRun"}
bad = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        errors = sorted(jsonschema.Draft7Validator(js).iter_errors(doc), key=lambda e: list(e.path))
        for e in errors:
            print(f"{path}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}", file=sys.stderr)
            bad = 1
        if len(doc["metadata"]["name"]) > 42:
            print(f"{path}: metadata.name is longer than 42 characters", file=sys.stderr)
            bad = 1
print(f"{len(sys.argv) - 2} example files checked against the AgentRun schema")
sys.exit(bad)
PY

echo "== image names and tags agree"
python3 - "$root" <<'PY' || fail=1
import re, sys, tomllib, yaml
root = sys.argv[1]
version = tomllib.load(open(f"{root}/Cargo.toml", "rb"))["workspace"]["package"]["version"]
chart = yaml.safe_load(open(f"{root}/helm/agentrun/Chart.yaml"))
values = yaml.safe_load(open(f"{root}/helm/agentrun/values.yaml"))
dockerfile = open(f"{root}/docker/Dockerfile").read()
docs = open(f"{root}/docs/operator.md").read()
kind = open(f"{root}/scripts/e2e-kind.sh").read()
install = [d for d in yaml.safe_load_all(open(f"{root}/manifests/install.yaml")) if d]
want = {c: f"ghcr.io/agentrun/agentrun-{c}:{version}" for c in ("operator", "sidecar", "relay", "archiver")}
# The plain install leaves archiving off (archive.enabled), so it has no archiver.
want_installed = {i for c, i in want.items() if c != "archiver"}
bad = []
if str(chart["appVersion"]) != version:
    bad.append(f"helm/agentrun/Chart.yaml appVersion {chart['appVersion']} is not Cargo.toml's workspace version {version}")
for c, image in want.items():
    name = f"{values['image']['registry']}/{values[c]['image']['repository']}"
    tag = values[c]["image"].get("tag") or values["image"].get("tag") or chart["appVersion"]
    if f"{name}:{tag}" != image:
        bad.append(f"values.yaml names the {c} image {name}:{tag}, not {image}")
    if not re.search(rf"--target {c} +-t {re.escape(image)} \.", dockerfile):
        bad.append(f"docker/Dockerfile does not document `--target {c} -t {image} .`")
    if not re.search(rf"^FROM .* AS {c}$", dockerfile, re.M):
        bad.append(f"docker/Dockerfile has no stage {c}")
    if image not in docs:
        bad.append(f"docs/operator.md does not name {image}")
images = set()
for d in install:
    if d["kind"] in ("Deployment", "StatefulSet"):
        for ctr in d["spec"]["template"]["spec"]["containers"]:
            images.add(ctr["image"])
            for e in ctr.get("env", []):
                if e["name"] == "AGENTRUN_SIDECAR_IMAGE":
                    images.add(e["value"])
ours = {i for i in images if i.startswith("ghcr.io/agentrun/")}
if ours != want_installed:
    bad.append(f"manifests/install.yaml uses {sorted(ours)}, not {sorted(want_installed)}")
if "ghcr.io/agentrun/agentrun-" not in kind or "docker/Dockerfile" not in kind:
    bad.append("scripts/e2e-kind.sh does not build the images from docker/Dockerfile with the chart's names")
for b in bad:
    print(b, file=sys.stderr)
print(f"images: {', '.join(want.values())}")
sys.exit(1 if bad else 0)
PY

echo "== manifests/install.yaml"
render_install > "$work/install.yaml"
if ! diff -u "$install" "$work/install.yaml" > "$work/install.diff"; then
  head -50 "$work/install.diff" >&2
  echo "manifests/install.yaml is out of date with helm/agentrun: run scripts/check-chart.sh --update" >&2
  fail=1
fi
kubernetes-validate --strict --quiet -k 1.35.0 "$install" || { echo "manifests/install.yaml does not validate" >&2; fail=1; }

if [ "$fail" != 0 ]; then
  echo "check-chart: FAILED" >&2
  exit 1
fi
echo "check-chart: all chart, CRD and manifest checks passed"
