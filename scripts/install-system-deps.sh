#!/usr/bin/env bash
# System packages for the napari tests: an X server (Xvfb) and the libraries Qt's xcb platform
# plugin needs beyond a base Debian/Ubuntu image. Called by `make test` and by .ci/run.
#
# Quiet and idempotent: does nothing when the packages are already installed. Installs with
# apt-get as root, or through sudo when that works without a password (or asks for it on a
# terminal). When it cannot install (no apt-get, no root), it prints what to install and exits 0:
# the napari tests are then skipped with that reason (tests/conftest.py), the others run.
#
#   scripts/install-system-deps.sh            # best effort (make test)
#   scripts/install-system-deps.sh --strict   # exit 1 when the packages cannot be installed (CI)
set -u

PACKAGES=(xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0)
strict=0
[ "${1:-}" = "--strict" ] && strict=1

say() { echo "install-system-deps: $*" >&2; }

give_up() {
  say "$1"
  say "install these yourself for the napari tests: ${PACKAGES[*]} (Debian/Ubuntu names);"
  [ "$strict" = 1 ] && say "--strict: failing." || say "without them the napari tests are skipped."
  exit "$strict"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  command -v Xvfb >/dev/null 2>&1 && exit 0  # not Debian-like, but an X server is there: let the tests try
  give_up "no apt-get on this machine."
fi

missing=()
for package in "${PACKAGES[@]}"; do
  installed "$package" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
elif command -v sudo >/dev/null 2>&1 && [ -t 0 ]; then
  say "sudo is needed to install: ${missing[*]}"
  sudo=(sudo)
else
  give_up "not root and no sudo, so cannot install: ${missing[*]}."
fi

say "installing ${missing[*]} (apt-get) ..."
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
apt=("${sudo[@]}" apt-get -q -o DPkg::Lock::Timeout=300)
if "${apt[@]}" install -y --no-upgrade "${missing[@]}" >"$log" 2>&1 \
   || { "${apt[@]}" update >>"$log" 2>&1 && "${apt[@]}" install -y --no-upgrade "${missing[@]}" >>"$log" 2>&1; }; then
  rm -f "$log"
  say "done."
  exit 0
fi
tail -n 15 "$log" >&2
rm -f "$log"
give_up "apt-get could not install: ${missing[*]}."
