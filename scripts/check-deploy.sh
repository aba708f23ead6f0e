#!/usr/bin/env bash
# Checks docker/ without a Docker engine or a cluster: the compose file against the
# compose-spec schema, the Kubernetes manifests against Kubernetes' schemas (strict), the
# Gateway API Inference Extension objects against schemas made from their CRDs
# (docker/check/crd_schema.py) plus the endpoint picker's config, YAML style, both
# Dockerfiles with a Dockerfile linter, and the wisp configs they ship with
# `wisp config check`. The Grafana dashboard's queries are checked against a live scrape by
# host/tests/operations.rs. Needs .venv (scripts/setup-test-deps.sh) and the wisp binary.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$(pwd)/$target" ;; esac
WISP="$target/release/wisp"

.venv/bin/pip install --quiet --disable-pip-version-check -r docker/check/requirements.txt
if [ ! -x docker/check/node_modules/.bin/dockerfile-utils ]; then
  (cd docker/check && npm install --no-audit --no-fund --loglevel=error)
fi

echo "deploy: compose file"
.venv/bin/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
echo "deploy: Kubernetes manifests"
.venv/bin/kubernetes-validate --kubernetes-version 1.31 --strict --quiet \
  docker/k8s/configmap.yaml docker/k8s/secret.yaml docker/k8s/deployment.yaml docker/k8s/service.yaml docker/k8s/hpa.yaml \
  docker/k8s/inference-gateway/epp.yaml docker/k8s/inference-gateway/hpa.yaml
echo "deploy: Gateway API objects"
# kubernetes-validate skips custom kinds; these schemas come from the released CRDs and
# reject unknown fields (see the $comment in each for the source and how to regenerate).
.venv/bin/check-jsonschema --schemafile docker/check/schemas/inferencepool-v1.json docker/k8s/inference-gateway/inferencepool.yaml
.venv/bin/check-jsonschema --schemafile docker/check/schemas/httproute-v1.json docker/k8s/inference-gateway/httproute.yaml
echo "deploy: endpoint picker config"
# The EPP decodes its config strictly and fails at start on an undeclared pluginRef; also
# checks that the picker, its Service, the InferencePool and the HTTPRoute name each other.
.venv/bin/python - <<'PY'
import sys, yaml
d = "docker/k8s/inference-gateway/"
def fail(msg):
    sys.exit(f"endpoint picker: {msg}")
epp = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(open(d + "epp.yaml"))}
cfg = yaml.safe_load(epp["ConfigMap", "wisp-epp"]["data"]["config.yaml"])
if (cfg.get("apiVersion"), cfg.get("kind")) != ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig"):
    fail("config.yaml is not an inference.networking.x-k8s.io/v1alpha1 EndpointPickerConfig")
known = {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector", "dataLayer", "flowControl", "parser"}
if set(cfg) - known:
    fail(f"unknown keys {sorted(set(cfg) - known)}")
for key in ("plugins", "schedulingProfiles", "dataLayer"):
    if not cfg.get(key):
        fail(f"no {key}")
declared = {p.get("name") or p["type"] for p in cfg["plugins"]}
refs = [p["pluginRef"] for prof in cfg["schedulingProfiles"] for p in prof["plugins"]]
refs += [cfg[k]["pluginRef"] for k in ("saturationDetector", "parser") if k in cfg]
for src in cfg["dataLayer"]["sources"]:
    refs += [src["pluginRef"]] + [e["pluginRef"] for e in src["extractors"]]
if set(refs) - declared:
    fail(f"pluginRef to undeclared plugins {sorted(set(refs) - declared)}")
for p in cfg["plugins"]:
    if p["type"] == "core-metrics-extractor":
        params = p.get("parameters") or {}
        engines = {e["name"] for e in params.get("engineConfigs", [])} | {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm"}
        if params.get("defaultEngine", "vllm") not in engines:
            fail(f"defaultEngine {params['defaultEngine']} has no engineConfigs entry")
args = epp["Deployment", "wisp-epp"]["spec"]["template"]["spec"]["containers"][0]["args"]
if any(a.startswith(("--total-", "--kv-cache-usage", "--lora-info", "--cache-info")) for a in args):
    fail("metric flags are errors since v1.4; use engineConfigs")
pool = yaml.safe_load(open(d + "inferencepool.yaml"))
if args[args.index("--pool-name") + 1] != pool["metadata"]["name"]:
    fail("--pool-name is not the InferencePool's name")
ref = pool["spec"]["endpointPickerRef"]
if ("Service", ref["name"]) not in epp or ref.get("port", {}).get("number") not in [p["port"] for p in epp["Service", ref["name"]]["spec"]["ports"]]:
    fail("endpointPickerRef does not name a port of the picker's Service")
route = yaml.safe_load(open(d + "httproute.yaml"))
if not any(b.get("kind") == "InferencePool" and b["name"] == pool["metadata"]["name"] for r in route["spec"]["rules"] for b in r["backendRefs"]):
    fail("the HTTPRoute sends nothing to the InferencePool")
PY
echo "deploy: YAML style"
.venv/bin/yamllint --strict -d '{extends: default, rules: {line-length: {max: 200}, document-start: disable, truthy: {check-keys: false}}}' docker/
echo "deploy: Dockerfiles"
docker/check/node_modules/.bin/dockerfile-utils lint docker/Dockerfile
docker/check/node_modules/.bin/dockerfile-utils lint docker/Dockerfile.cuda
echo "deploy: wisp configs"
"$WISP" config check docker/wisp.toml >/dev/null
configmap_toml="$(mktemp)"
trap 'rm -f "$configmap_toml"' EXIT
.venv/bin/python - "$configmap_toml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open("docker/k8s/configmap.yaml"))
open(sys.argv[1], "w").write(doc["data"]["wisp.toml"])
PY
"$WISP" config check "$configmap_toml" >/dev/null
echo "deploy: ok"
