#!/usr/bin/env bash
# Idempotent machine + project set-up for ciliary.
#
# Installs the Debian packages the datapath needs, links kernel headers for bcc when the
# running kernel ships none, creates .venv with the project and its dev tools, and makes the
# Debian bcc package importable inside that venv. Safe to run any number of times; each step
# checks before it acts.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(python3-bpfcc libbpfcc linux-headers-amd64 iproute2 iptables nftables curl chromium fonts-dejavu-core
    podman containerd runc containernetworking-plugins prometheus openssl)

log() { printf '[setup] %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "debian packages present"
        return
    fi
    log "installing debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

link_kernel_headers() {
    local release build arch_dir common_dir
    release="$(uname -r)"
    build="/lib/modules/$release/build"
    if [ -e "$build/include/linux/kconfig.h" ] || [ -e "$build/Makefile" ]; then
        log "kernel headers available at $build"
        return
    fi
    arch_dir="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
    common_dir="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)"
    if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
        log "ERROR: no Debian linux-headers trees under /usr/src" >&2
        exit 1
    fi
    log "linking $build -> $arch_dir and source -> $common_dir"
    as_root mkdir -p "/lib/modules/$release"
    as_root ln -sfn "$arch_dir" "$build"
    as_root ln -sfn "$common_dir" "/lib/modules/$release/source"
}

create_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.ciliary-installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        log "installing ciliary and dev tools into $VENV"
        "$VENV/bin/pip" install -q -e "$ROOT[dev]"
        touch "$stamp"
    else
        log "venv up to date"
    fi
}

link_bcc() {
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if [ ! -e "$site/bcc" ]; then
        log "linking Debian bcc into the venv"
        ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
    fi
    "$VENV/bin/python" -c 'import bcc' || { log "ERROR: bcc not importable in venv" >&2; exit 1; }
    log "bcc importable"
}

install_debian_packages
link_kernel_headers
create_venv
link_bcc
log "ready"
