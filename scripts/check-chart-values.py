#!/usr/bin/env python3
"""Checks that a rendering of helm/agentrun does what its values ask (scripts/check-chart.sh).

    check-chart-values.py NAME RENDERED.yaml

NAME is one of check-chart.sh's value sets; the checks common to every set run first, then the
set's own. Exits 1 with one line per failed check.
"""
import json
import sys

import yaml

name, path = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
failures = []


def check(cond, what):
    if not cond:
        failures.append(f"{name}: {what}")


def find(kind, suffix):
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def one(kind, suffix):
    found = find(kind, suffix)
    if len(found) != 1:
        failures.append(f"{name}: expected one {kind} *{suffix}, found {len(found)}")
        return {}
    return found[0]


def pod(suffix):
    kind = "StatefulSet" if suffix == "-redis" else "Deployment"
    return one(kind, suffix).get("spec", {}).get("template", {}).get("spec", {})


def container(suffix):
    spec = pod(suffix)
    return spec.get("containers", [{}])[0] if spec else {}


def env(suffix):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(suffix).get("env", [])}


def mounts(suffix):
    return {m["name"]: m for m in container(suffix).get("volumeMounts", [])}


def volumes(suffix):
    return {v["name"]: v for v in pod(suffix).get("volumes", [])}


def secret_of(suffix, volume):
    return volumes(suffix).get(volume, {}).get("secret", {})


relay_env, operator_env = env("-relay"), env("-operator")
mode = relay_env.get("AGENTRUN_AUTH")

# --- every value set -------------------------------------------------------------------------
check(mode in ("none", "token", "kubernetes"), f"relay AGENTRUN_AUTH is {mode!r}")
for comp in ("-relay", "-operator", "-redis", "-archiver"):
    if not find("Deployment" if comp != "-redis" else "StatefulSet", comp):
        continue
    vols = volumes(comp)
    for m in mounts(comp).values():
        if "secret" in vols.get(m["name"], {}):
            check(m.get("readOnly") is True, f"{comp} mounts Secret volume {m['name']} read-only")
            check("subPath" not in m, f"{comp} mounts {m['name']} without subPath (updates reach it)")
            mode_bits = vols[m["name"]]["secret"].get("defaultMode")
            check(mode_bits == 0o440, f"{comp} Secret volume {m['name']} has defaultMode 0440, not {mode_bits}")
    for m in mounts(comp):
        check(m in vols or (comp == "-redis" and m == "data"), f"{comp} mounts {m}, which is a volume")
relay_roles = find("ClusterRole", "-relay-auth")
relay_bindings = find("ClusterRoleBinding", "-relay-auth")
relay_sa = one("ServiceAccount", "-relay")
if mode == "kubernetes":
    check(len(relay_roles) == 1 and len(relay_bindings) == 1, "kubernetes mode has the relay's ClusterRole and binding")
    if relay_roles:
        rules = sorted(
            (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in relay_roles[0]["rules"]
        )
        check(
            rules
            == [
                (("authentication.k8s.io",), ("tokenreviews",), ("create",)),
                (("authorization.k8s.io",), ("subjectaccessreviews",), ("create",)),
            ],
            f"the relay's ClusterRole allows creating TokenReviews and SubjectAccessReviews only: {rules}",
        )
    if relay_bindings:
        b = relay_bindings[0]
        check(b["roleRef"]["name"] == relay_roles[0]["metadata"]["name"] if relay_roles else False, "binding names the role")
        check(
            b["subjects"] == [{"kind": "ServiceAccount", "name": relay_sa["metadata"]["name"], "namespace": relay_sa["metadata"]["namespace"]}],
            f"binding's subject is the relay's ServiceAccount: {b['subjects']}",
        )
    check(relay_sa.get("automountServiceAccountToken") is True, "kubernetes mode mounts the relay's token (ServiceAccount)")
    check(pod("-relay").get("automountServiceAccountToken") is True, "kubernetes mode mounts the relay's token (pod)")
else:
    check(not relay_roles and not relay_bindings, f"no relay RBAC outside kubernetes mode (mode {mode})")
    check(relay_sa.get("automountServiceAccountToken") is False, "the relay's ServiceAccount token is not mounted")
    check(pod("-relay").get("automountServiceAccountToken") is False, "the relay pod mounts no token")
if mode == "token":
    check(relay_env.get("AGENTRUN_TOKENS_FILE") == "/etc/agentrun/relay-auth/tokens", "token mode sets AGENTRUN_TOKENS_FILE")
    m = mounts("-relay").get("relay-tokens", {})
    check(m.get("mountPath") == "/etc/agentrun/relay-auth", f"the tokens Secret is mounted at /etc/agentrun/relay-auth: {m}")
    check(secret_of("-relay", "relay-tokens").get("items") == [{"key": "tokens", "path": "tokens"}], "only the key tokens is mounted")
else:
    check("AGENTRUN_TOKENS_FILE" not in relay_env and "relay-tokens" not in volumes("-relay"), "no tokens file outside token mode")
generated = find("Secret", "-relay-tokens")
if mode == "token" and secret_of("-relay", "relay-tokens").get("secretName", "").endswith("-relay-tokens"):
    check(len(generated) == 1, "a generated tokens Secret")
    for s in generated:
        lines = [l for l in s["stringData"]["tokens"].splitlines() if l and not l.startswith("#")]
        check(len(lines) == 1 and len(lines[0]) >= 32, "one generated token of 32+ characters")
        check(s["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep", "the tokens Secret is kept")
else:
    check(not generated, "no generated tokens Secret when one is given or the mode needs none")
for var in ("AGENTRUN_REDIS_URL", "AGENTRUN_REDIS_PASSWORD"):
    check(relay_env.get(var) == operator_env.get(var), f"operator and relay agree on {var}")

# Agent pods: what the operator is told to put into them.
sidecar_sc = json.loads(operator_env.get("AGENTRUN_SIDECAR_SECURITY_CONTEXT", "null") or "null")
sidecar_resources = json.loads(operator_env.get("AGENTRUN_SIDECAR_RESOURCES", "null") or "null")
check(isinstance(sidecar_sc, dict), f"the operator gets AGENTRUN_SIDECAR_SECURITY_CONTEXT as a JSON object: {sidecar_sc!r}")
check(isinstance(sidecar_resources, dict), f"the operator gets AGENTRUN_SIDECAR_RESOURCES as a JSON object: {sidecar_resources!r}")
sidecar_sc = sidecar_sc if isinstance(sidecar_sc, dict) else {}
for key, want in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False),
                  ("capabilities", {"drop": ["ALL"]})):
    check(sidecar_sc.get(key) == want, f"the sidecar containers keep {key}: {want} (Pod Security restricted): {sidecar_sc}")
fs_group = operator_env.get("AGENTRUN_POD_FS_GROUP")
check(fs_group == "none" or (fs_group or "").isdigit(), f"AGENTRUN_POD_FS_GROUP is a number or none: {fs_group!r}")
# The start-up check asks about the operator's own permissions: it may create SelfSubjectAccessReviews.
review_roles = find("ClusterRole", "-operator-self-review")
review_bindings = find("ClusterRoleBinding", "-operator-self-review")
check(
    len(review_roles) == 1
    and [(r["apiGroups"], r["resources"], r["verbs"]) for r in review_roles[0]["rules"]]
    == [(["authorization.k8s.io"], ["selfsubjectaccessreviews"], ["create"])],
    "the operator may create SelfSubjectAccessReviews and nothing more through its self-review ClusterRole",
)
check(
    len(review_bindings) == 1
    and review_bindings[0]["subjects"][0]["name"] == one("ServiceAccount", "-operator").get("metadata", {}).get("name"),
    "the self-review ClusterRole is bound to the operator's ServiceAccount",
)
own_pod_sc = [pod(c).get("securityContext", {}) for c in ("-operator", "-relay", "-redis", "-archiver") if find("Deployment" if c != "-redis" else "StatefulSet", c)]
watch_ns = operator_env.get("AGENTRUN_WATCH_NAMESPACE")
main_bindings = [b for b in docs if b["kind"] in ("ClusterRoleBinding", "RoleBinding") and b["roleRef"]["name"].endswith("-operator")]
if watch_ns:
    check(
        [(b["kind"], b["metadata"].get("namespace")) for b in main_bindings] == [("RoleBinding", watch_ns)],
        f"with operator.watchNamespace the operator's ClusterRole is bound in {watch_ns} only: {[(b['kind'], b['metadata'].get('namespace')) for b in main_bindings]}",
    )
else:
    check([b["kind"] for b in main_bindings] == ["ClusterRoleBinding"], "without watchNamespace the operator's ClusterRole is bound cluster-wide")

# The archiver: there exactly when archiving is on, and then the operator queues finished runs.
archivers = find("Deployment", "-archiver")
archiver_env = env("-archiver") if archivers else {}
check((operator_env.get("AGENTRUN_ARCHIVE") == "true") == bool(archivers), "the operator archives runs exactly when the archiver is installed")
check(("AGENTRUN_ARCHIVE_URL" in env("-relay")) == bool(archivers), "the relay reads the archive exactly when there is one")
if archivers:
    for var in ("AGENTRUN_REDIS_URL", "AGENTRUN_REDIS_PASSWORD", "AGENTRUN_REDIS_CA_FILE"):
        check(archiver_env.get(var) == relay_env.get(var), f"archiver and relay agree on {var}")
    check(archiver_env.get("AGENTRUN_ARCHIVER_CONSUMER") == {"fieldRef": {"fieldPath": "metadata.name"}}, "each archiver pod is its own consumer (the pod name)")
    sa = one("ServiceAccount", "-archiver")
    check(sa.get("automountServiceAccountToken") is False and pod("-archiver").get("automountServiceAccountToken") is False, "the archiver mounts no Kubernetes token")
    check(pod("-archiver").get("serviceAccountName") == sa.get("metadata", {}).get("name"), "the archiver runs as its ServiceAccount")
    check(not [b for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding") and "archiver" in b["metadata"]["name"]], "the archiver has no Kubernetes RBAC")
    check(one("Service", "-archiver-metrics").get("spec", {}).get("ports", [{}])[0].get("name") == "http", "the archiver's metrics Service")
else:
    check(not find("ServiceAccount", "-archiver") and not find("PersistentVolumeClaim", "-archive"), "nothing of the archiver when archiving is off")

# --- each value set --------------------------------------------------------------------------
if name == "openshift":
    check(fs_group == "none", f"OpenShift assigns the agent pods' fsGroup: {fs_group}")
    check("runAsUser" not in sidecar_sc and "runAsGroup" not in sidecar_sc, f"OpenShift assigns the sidecars' user: {sidecar_sc}")
    for sc in own_pod_sc:
        check(not {"runAsUser", "runAsGroup", "fsGroup"} & set(sc), f"OpenShift assigns the chart pods' ids: {sc}")
        check(sc.get("runAsNonRoot") is True, f"the chart pods still run as non-root: {sc}")
else:
    for sc in own_pod_sc:
        check(sc.get("runAsUser") == 65532 and sc.get("fsGroup") == 65532, f"the chart pods run as 65532: {sc}")
check(operator_env.get("AGENTRUN_SIDECAR_DURABILITY") == ("replicas=1,timeout=500" if name == "private-quota" else "none"),
      f"sidecar durability: {operator_env.get('AGENTRUN_SIDECAR_DURABILITY')}")
if name == "private-quota":
    check(operator_env.get("AGENTRUN_SIDECAR_IMAGE_PULL_SECRETS") == "regcred,mirror", f"sidecar pull Secrets: {operator_env.get('AGENTRUN_SIDECAR_IMAGE_PULL_SECRETS')}")
    check(sidecar_resources == {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}}, f"sidecar resources with a CPU limit: {sidecar_resources}")
    check(fs_group == "2000", f"agentPods.fsGroup: {fs_group}")
    check(sidecar_sc.get("runAsUser") == 1000 and sidecar_sc.get("runAsGroup") == 65532, f"a changed sidecar user keeps the other defaults: {sidecar_sc}")
else:
    check("AGENTRUN_SIDECAR_IMAGE_PULL_SECRETS" not in operator_env, "no sidecar pull Secrets unless asked for")
if name == "default":
    check(fs_group == "65532", f"agent pods get fsGroup 65532 by default: {fs_group}")
    check(sidecar_sc.get("runAsUser") == 65532 and sidecar_sc.get("runAsGroup") == 65532, f"the sidecars run as 65532 by default: {sidecar_sc}")
    check(sidecar_resources == {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}, f"default sidecar resources: {sidecar_resources}")
    check(mode == "token", "the default relay auth is token")
    check(relay_env["AGENTRUN_REDIS_URL"].startswith("redis://"), "plain Redis by default")
    check("AGENTRUN_CORS_ORIGINS" not in relay_env, "no CORS origins by default")
    redis_args = container("-redis").get("args", [])
    for flag, value in (("--maxmemory", "768mb"), ("--maxmemory-policy", "noeviction")):
        at = redis_args.index(flag) if flag in redis_args else -1
        check(at >= 0 and redis_args[at + 1] == value, f"the bundled Redis runs with {flag} {value}: {redis_args}")
elif name == "auth-token-secret":
    check(secret_of("-relay", "relay-tokens").get("secretName") == "viewer-tokens", "the given tokens Secret is mounted")
elif name == "auth-kubernetes":
    check(mode == "kubernetes", "mode kubernetes")
elif name == "auth-none-cors":
    check(mode == "none", "mode none")
    check(relay_env.get("AGENTRUN_CORS_ORIGINS") == "https://a.example.com,https://b.example.com:8443", f"CORS origins: {relay_env.get('AGENTRUN_CORS_ORIGINS')}")
    check(not volumes("-relay") and "volumeMounts" not in container("-relay"), "no volumes without tokens or TLS")
elif name.startswith("redis-tls"):
    bundled = name == "redis-tls-bundled"
    ca_key = "bundle.pem" if bundled else "ca.crt"
    for comp, e in (("-relay", relay_env), ("-operator", operator_env)):
        check(e.get("AGENTRUN_REDIS_CA_FILE") == "/etc/agentrun/redis-tls/ca/ca.crt", f"{comp} AGENTRUN_REDIS_CA_FILE")
        check(secret_of(comp, "redis-tls-ca") == {"secretName": "redis-ca", "defaultMode": 0o440, "items": [{"key": ca_key, "path": "ca.crt"}]}, f"{comp} CA volume: {secret_of(comp, 'redis-tls-ca')}")
        check(mounts(comp).get("redis-tls-ca", {}).get("mountPath") == "/etc/agentrun/redis-tls/ca", f"{comp} CA mount")
        has_client = "AGENTRUN_REDIS_CLIENT_CERT" in e and "AGENTRUN_REDIS_CLIENT_KEY" in e
        check(has_client == bundled, f"{comp} client certificate env only with clientCertSecret")
        check(("redis-tls-client" in volumes(comp)) == bundled, f"{comp} client certificate volume only with clientCertSecret")
    sidecar_cert = operator_env.get("AGENTRUN_SIDECAR_REDIS_CLIENT_CERT")
    check((sidecar_cert == "/etc/agentrun/redis-tls/client/tls.crt") == bundled, "the sidecars get the client certificate")
    if bundled:
        check(relay_env["AGENTRUN_REDIS_URL"].startswith("rediss://"), "the bundled Redis is reached with rediss://")
        args = container("-redis").get("args", [])
        for flag, value in (("--port", "0"), ("--tls-port", "6379"), ("--tls-auth-clients", "yes"),
                            ("--tls-cert-file", "/etc/agentrun/redis-tls/server/tls.crt"),
                            ("--tls-ca-cert-file", "/etc/agentrun/redis-tls/ca/ca.crt")):
            check(flag in args and args[args.index(flag) + 1] == value, f"redis-server {flag} {value}: {args}")
        check(secret_of("-redis", "redis-tls-server").get("secretName") == "redis-server", "the server certificate is mounted")
        probe = container("-redis").get("readinessProbe", {}).get("exec", {}).get("command", [])
        check("--tls" in probe and "--cert" in probe, f"the readiness probe speaks TLS: {probe}")
    else:
        check(relay_env["AGENTRUN_REDIS_URL"] == "rediss://redis.example.com:6380", "the external rediss:// URL")
elif name in ("external-redis", "existing-secret", "external-cluster", "external-sentinel"):
    check(not find("StatefulSet", "-redis"), "no bundled Redis")

# A PodDisruptionBudget for the relays exactly when there are several.
relay_replicas = one("Deployment", "-relay").get("spec", {}).get("replicas")
relay_pdbs = find("PodDisruptionBudget", "-relay")
if relay_replicas and relay_replicas > 1:
    check(len(relay_pdbs) == 1 and relay_pdbs[0]["spec"].get("minAvailable") == 1, f"a PodDisruptionBudget keeps a relay up ({relay_replicas} replicas): {relay_pdbs}")
    labels = one("Deployment", "-relay").get("spec", {}).get("selector", {}).get("matchLabels")
    check(relay_pdbs and relay_pdbs[0]["spec"].get("selector", {}).get("matchLabels") == labels, "the budget selects the relay pods")
else:
    check(not relay_pdbs, f"no PodDisruptionBudget for a single relay (it would block drains): {relay_pdbs}")

if name == "external-redis":
    check(relay_env["AGENTRUN_REDIS_URL"] == "rediss://redis.example.com:6380", "the external URL")
elif name in ("external-cluster", "external-sentinel"):
    want_url = {
        "external-cluster": "redis+cluster://redis-0.redis:6379,redis-1.redis:6379,redis-2.redis:6379",
        "external-sentinel": "redis+sentinel://sentinel-0.sentinel:26379,sentinel-1.sentinel:26379/mymaster",
    }[name]
    check(relay_env["AGENTRUN_REDIS_URL"] == want_url, f"the relay gets the URL: {relay_env['AGENTRUN_REDIS_URL']}")
    check(operator_env.get("AGENTRUN_REDIS_URL") == want_url, f"the operator gets the URL (and hands it to sidecars): {operator_env.get('AGENTRUN_REDIS_URL')}")
    check(one("Deployment", "-relay").get("spec", {}).get("replicas") == {"external-cluster": 2, "external-sentinel": 3}[name], "relay.replicas")
elif name == "archive-fs":
    check(archiver_env.get("AGENTRUN_ARCHIVE_STORE_URL") == "file:///var/lib/agentrun/archive", f"the filesystem store by default: {archiver_env.get('AGENTRUN_ARCHIVE_STORE_URL')}")
    pvc = one("PersistentVolumeClaim", "-archive")
    check(pvc.get("metadata", {}).get("annotations", {}).get("helm.sh/resource-policy") == "keep", "the archive's claim outlives an uninstall")
    check(volumes("-archiver").get("archive", {}).get("persistentVolumeClaim", {}).get("claimName") == pvc.get("metadata", {}).get("name"), "the archiver mounts the claim")
    check(mounts("-archiver").get("archive", {}).get("mountPath") == "/var/lib/agentrun/archive", "at the store's folder")
    check(one("Deployment", "-archiver").get("spec", {}).get("strategy", {}).get("type") == "Recreate", "a ReadWriteOnce claim: Recreate")
    check("envFrom" not in container("-archiver"), "no credentials Secret unless asked for")
    check(env("-relay").get("AGENTRUN_ARCHIVE_URL") == "file:///var/lib/agentrun/archive", f"the relay reads the same store: {env('-relay').get('AGENTRUN_ARCHIVE_URL')}")
    check(volumes("-relay").get("archive", {}).get("persistentVolumeClaim", {}).get("claimName") == pvc.get("metadata", {}).get("name"), "the relay mounts the archive's claim")
    check(mounts("-relay").get("archive", {}).get("mountPath") == "/var/lib/agentrun/archive" and mounts("-relay").get("archive", {}).get("readOnly") is True, "read only, at the store's folder")
elif name == "archive-s3":
    check(archiver_env.get("AGENTRUN_ARCHIVE_STORE_URL") == "s3://agentrun-archive/runs", "archive.storeUrl reaches the archiver")
    check(container("-archiver").get("envFrom") == [{"secretRef": {"name": "archive-creds"}}], f"the credentials Secret becomes the environment: {container('-archiver').get('envFrom')}")
    check(not find("PersistentVolumeClaim", "-archive") and "archive" not in volumes("-archiver"), "no claim for an object store")
    check(one("Deployment", "-archiver").get("spec", {}).get("replicas") == 2, "archiver.replicas")
    check("eks.amazonaws.com/role-arn" in one("ServiceAccount", "-archiver").get("metadata", {}).get("annotations", {}), "ServiceAccount annotations for the cloud identity")
    check(mounts("-archiver").get("redis-tls-ca", {}).get("mountPath") == "/etc/agentrun/redis-tls/ca", "the archiver reaches Redis over TLS like the others")
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"].endswith("-archiver")]
    check(len(monitors) == 1, "a ServiceMonitor for the archiver")
    check(env("-relay").get("AGENTRUN_ARCHIVE_URL") == "s3://agentrun-archive/runs", "the relay reads the same store")
    check(container("-relay").get("envFrom") == [{"secretRef": {"name": "archive-creds"}}], "with the same credentials")
    check("archive" not in volumes("-relay"), "no claim for an object store")
elif name.startswith("relay-tls"):
    relay_env = env("-relay")
    secret = "relay-cert" if name == "relay-tls" else "agentrun-relay-tls"
    check(relay_env.get("AGENTRUN_TLS_CERT") == "/etc/agentrun/relay-tls/tls.crt"
          and relay_env.get("AGENTRUN_TLS_KEY") == "/etc/agentrun/relay-tls/tls.key",
          "the relay gets --tls-cert and --tls-key")
    check(mounts("-relay").get("relay-tls", {}).get("mountPath") == "/etc/agentrun/relay-tls",
          "the relay's certificate is mounted as a directory (renewals reach it)")
    check(secret_of("-relay", "relay-tls").get("secretName") == secret, f"the certificate comes from {secret}")
    probes = [container("-relay").get(p, {}).get("httpGet", {}) for p in ("livenessProbe", "readinessProbe")]
    check(all(p.get("scheme") == "HTTPS" for p in probes), "the probes speak HTTPS")
    certificates = [d for d in docs if d["kind"] == "Certificate"]
    if name == "relay-tls":
        check(not certificates, "no Certificate without certManager")
        ingress = one("Ingress", "-relay")
        check(ingress.get("metadata", {}).get("annotations", {}).get("nginx.ingress.kubernetes.io/backend-protocol") == "HTTPS",
              "the Ingress speaks HTTPS to a relay that serves it")
    else:
        check(len(certificates) == 1, "one Certificate")
        spec = certificates[0]["spec"] if certificates else {}
        check(spec.get("secretName") == secret, "the Certificate fills the mounted Secret")
        names = spec.get("dnsNames", [])
        if name == "relay-tls-cert-manager-public":
            check(names == ["agentrun.example.com"],
                  f"with serviceNames=false the Certificate names only the extra names: {names}")
        else:
            check("agentrun-relay.agentrun.svc" in names and "localhost" in names and "agentrun.example.com" in names,
                  f"the Certificate covers the Service, port-forward and the extra names: {names}")
        check(spec.get("issuerRef", {}).get("kind") == "ClusterIssuer", "the issuer kind is passed")
else:
    check(not any(d["kind"] == "Certificate" for d in docs), "no Certificate unless relay.tls.certManager")
    check("AGENTRUN_TLS_CERT" not in env("-relay"), "plain HTTP unless relay.tls")
if name == "everything":
    check(watch_ns == "agents", f"operator.watchNamespace reaches the operator: {watch_ns}")
    ing = one("Ingress", "-relay")
    check(ing.get("spec", {}).get("tls", [{}])[0].get("secretName") == "tls", "the Ingress serves TLS")
    check(operator_env.get("AGENTRUN_RELAY_URL") == "https://agentrun.example.com", "status.url uses the Ingress host")

for f in failures:
    print(f, file=sys.stderr)
sys.exit(1 if failures else 0)
