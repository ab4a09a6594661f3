#!/usr/bin/env bash
# Installs the Debian packages edge-agent needs, only when missing.
#   base: what building the virtualenv and `make demo` need (venv module, Mosquitto: the demo
#         shows the agent's health and events over MQTT and the dashboard)
#   test: base + the real servers and tools the tests use (nginx, chromium …)
set -euo pipefail
want=()
python=$(command -v python3.11 || command -v python3)
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then want+=(python3-venv); fi
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || want+=(mosquitto)
command -v mosquitto_sub >/dev/null || want+=(mosquitto-clients)
if [ "${1:-base}" = test ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || want+=(nginx)
  command -v curl >/dev/null || want+=(curl)
  # The dashboard test drives Debian's browser; no browser is ever downloaded.
  [ -x /usr/bin/chromium ] || want+=(chromium)
  [ -x /usr/bin/chromedriver ] || want+=(chromium-driver)
  command -v systemd-analyze >/dev/null || want+=(systemd)
  # The .deb's postinst builds its venv with the distribution's interpreter.
  if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    want+=(python3-venv)
  fi
  # The unit runs under a real systemd (PID 1 in a container booted from this machine's root).
  command -v systemd-nspawn >/dev/null || want+=(systemd-container)
  # The package is also tested on a minimal Debian 12 (debootstrap --variant=minbase, cached
  # in ~/.cache/edge-agent-tests) and checked with Debian's lintian.
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || want+=(debootstrap)
  command -v lintian >/dev/null || want+=(lintian)
  # The arm64 package runs in an emulated arm64 Debian 12 root (tests/arm64): qemu-user for
  # aarch64, registered with binfmt_misc by the test for its duration.
  [ -x /usr/bin/qemu-aarch64-static ] || want+=(qemu-user-static)
  command -v update-binfmts >/dev/null || [ -x /usr/sbin/update-binfmts ] || want+=(binfmt-support)
  command -v gcc >/dev/null || want+=(gcc)
  # The fleet store's tests start a real PostgreSQL (initdb in a temporary directory).
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || want+=(postgresql)
fi
[ ${#want[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${want[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "installing Debian packages: ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
# The packaged services must not hold the ports or files the tests use.
for svc in mosquitto nginx postgresql; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $sudo systemctl stop "$svc" || true
  fi
done
