#!/usr/bin/env bash
# Installs the benchmark peers and load tools from Debian's packages (and
# oha from crates.io with --with-oha). Safe to run again: it only installs
# what is missing. Needs root (or sudo) for apt.
set -euo pipefail

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)

if ((${#need[@]})); then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    echo "installing: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages start system services we do not want listening.
    for svc in nginx haproxy; do
        $sudo systemctl stop "$svc" 2>/dev/null || $sudo service "$svc" stop 2>/dev/null || true
    done
fi

if [ "${1:-}" = "--with-oha" ] && ! command -v oha >/dev/null; then
    echo "installing oha (cargo install, a few minutes)"
    cargo install --locked oha
fi
echo "peers ready: $(for t in nginx haproxy wrk h2load oha; do command -v $t >/dev/null && printf '%s ' $t; done)"
