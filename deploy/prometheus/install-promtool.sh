#!/usr/bin/env bash
# Installs promtool (from Debian's prometheus package) when it is missing;
# the alert-rule tests need it. Safe to run again.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then
  sudo_cmd="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -qq
# --no-install-recommends: promtool only, not a running Prometheus.
$sudo_cmd apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package starts a Prometheus server; the tests need only promtool.
$sudo_cmd systemctl disable --now prometheus >/dev/null 2>&1 || true
command -v promtool
