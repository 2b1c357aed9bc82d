#!/usr/bin/env bash
# Installs the benchmark peers and load tools from Debian's packages.
#   --with-oha      also oha (cargo install; a few minutes)
#   --with-pingora  also build the pingora peer (needs cmake; ~8 minutes)
# Safe to run again: it only installs what is missing. Needs root (or sudo)
# for apt.
set -euo pipefail

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
case " $* " in *" --with-pingora "*) command -v cmake >/dev/null || need+=(cmake) ;; esac

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

case " $* " in *" --with-oha "*)
    if ! command -v oha >/dev/null; then
        echo "installing oha (cargo install, a few minutes)"
        cargo install --locked oha
    fi ;;
esac
case " $* " in *" --with-pingora "*)
    echo "building the pingora peer"
    cargo build --release --manifest-path "$(dirname "$0")/pingora-peer/Cargo.toml" ;;
esac
echo "peers ready: $(for t in nginx haproxy wrk h2load oha; do command -v $t >/dev/null && printf '%s ' $t; done)"
