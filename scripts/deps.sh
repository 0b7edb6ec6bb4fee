#!/usr/bin/env bash
# `make deps`: the system packages `make test` and `make demo` need (Debian/Ubuntu names).
# Installs the missing ones with apt-get when run as root; otherwise prints the exact command and fails.
# FIRMGATE_SKIP_DEPS=1 skips the check (the tests that need a missing tool then skip, and say so).
set -euo pipefail
[ "${FIRMGATE_SKIP_DEPS:-}" = 1 ] && exit 0

missing=()
any_file() { for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }
# A real VM for host-install, the demo and their tests.
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
any_file /usr/share/ovmf/OVMF.fd /usr/share/OVMF/OVMF.fd /usr/share/qemu/OVMF.fd || missing+=(ovmf)
# The broker's multi-replica database (make test starts a throwaway server).
any_file /usr/lib/postgresql/*/bin/initdb || missing+=(postgresql)
# Policy repositories are git repositories.
command -v git >/dev/null || missing+=(git)
# The Makefile's virtualenv (Debian splits ensurepip out of python3).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# The tenant console's browser test (headless Chromium driven by selenium).
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# objdump reads the add-ons firmgate builds in one PE test (an independent reader of the format).
command -v objdump >/dev/null || missing+=(binutils)

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "make deps: firmgate needs Python >= 3.11 as python3 (found: $(python3 --version 2>&1))" >&2
  exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "make deps: missing ${missing[*]} (Debian package names); install them with your system's package manager," >&2
  echo "           or run with FIRMGATE_SKIP_DEPS=1 to let the tests that need them skip" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "make deps: missing ${missing[*]}; run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  echo "(or FIRMGATE_SKIP_DEPS=1 make ... to let the tests that need them skip)" >&2
  exit 1
fi
echo "make deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
