#!/usr/bin/env bash
# Checks docker/ without a Docker engine or a cluster: the compose file against the
# compose-spec schema, the Kubernetes manifests against Kubernetes' schemas (strict), YAML
# style, both Dockerfiles with a Dockerfile linter, and the wisp configs they ship with
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
  docker/k8s/configmap.yaml docker/k8s/secret.yaml docker/k8s/deployment.yaml docker/k8s/service.yaml docker/k8s/hpa.yaml
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
