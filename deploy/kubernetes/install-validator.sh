#!/usr/bin/env bash
# Installs kubernetes-validate (from PyPI, with the Kubernetes OpenAPI
# schemas bundled) into target/kubernetes-validate when missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/kubernetes-validate"
if [ -x "$venv/bin/kubernetes-validate" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
"$venv/bin/kubernetes-validate" --version
