#!/usr/bin/env bash
# Build (or refresh) the arm64 user-mode sysroot of the aarch64 CI lane:
#   $OUT/sysroot   Debian bookworm arm64 python3.11 + its shared libraries (dpkg -x, no chroot, no binfmt),
#                  a fake /proc/cpuinfo, and aarch64 wheels of the runtime's dependencies + pytest
#                  (pip --target, pinned to the versions of the x86 venv) in usr/local/lib/python3.11/dist-packages.
# Run it through scripts/aarch64/python3 (qemu-aarch64 -L $OUT/sysroot).
#
# usage: setup-sysroot.sh OUT_DIR HOST_PYTHON
#   HOST_PYTHON: the x86 venv's python (its pip downloads the wheels; its package versions are the pins).
# Each step is skipped when its inputs are unchanged (stamps in $OUT/sysroot/.stamps), so a cached run
# costs a second. Downloads: ~15 MB of debs, ~80 MB of wheels. Needs no root (apt runs on private state).
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd)
host_py=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
root=$out/sysroot
stamps=$root/.stamps
log() { printf '[aarch64-setup] %s\n' "$*" >&2; }

# ---- 1. Debian arm64 packages, resolved by apt against a private state (the host's apt is untouched) ----
DEBS="python3.11-minimal libpython3.11-stdlib libstdc++6"
SUITE=bookworm
want_debs="$SUITE: $DEBS"
if [ "$(cat "$stamps/debs" 2>/dev/null)" != "$want_debs" ]; then
  log "resolving + downloading arm64 debs: $DEBS"
  apt_dir=$out/apt
  rm -rf "$apt_dir" "$root"
  mkdir -p "$apt_dir/sp" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/state" "$stamps"
  : > "$apt_dir/status"  # nothing installed: apt downloads the whole dependency closure
  cat > "$apt_dir/sp/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_opts=(-oDir::Etc::SourceList=/dev/null -oDir::Etc::SourceParts="$apt_dir/sp"
            -oDir::Etc::Preferences=/dev/null -oDir::Etc::PreferencesParts=/dev/null
            -oDir::State="$apt_dir/state" -oDir::State::Lists="$apt_dir/lists"
            -oDir::State::status="$apt_dir/status" -oDir::Cache="$apt_dir/cache"
            -oAPT::Architecture=arm64 -oAPT::Architectures::=arm64 -oAPT::Install-Recommends=0
            -oDebug::NoLocking=1)
  apt-get "${apt_opts[@]}" -qq update
  apt-get "${apt_opts[@]}" -qq -y --download-only install $DEBS >/dev/null
  for deb in "$apt_dir"/cache/archives/*.deb; do dpkg -x "$deb" "$root"; done
  log "unpacked $(ls "$apt_dir"/cache/archives/*.deb | wc -l) debs"

  # qemu -L looks a guest path up in the sysroot first and falls back to the host's: make sure nothing of
  # the host's x86 Python leaks in.
  mkdir -p "$root/usr/lib/python3/dist-packages" "$root/usr/local/lib/python3.11/dist-packages" "$root/etc"
  : > "$root/etc/ld.so.cache"
  # ONNX Runtime's cpuinfo parses /proc/cpuinfo and segfaults on the host's x86 one: give it an arm64 one
  # (a Cortex-A76, the CPU the launcher asks qemu to emulate).
  mkdir -p "$root/proc"
  : > "$root/proc/cpuinfo"
  for ((i = 0; i < $(getconf _NPROCESSORS_CONF); i++)); do
    cat >> "$root/proc/cpuinfo" <<EOF
processor	: $i
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x4
CPU part	: 0xd0b
CPU revision	: 1

EOF
  done
  rm -rf "$apt_dir/cache/archives"
  echo "$want_debs" > "$stamps/debs"
fi

# ---- 2. aarch64 wheels: the runtime's dependencies ([project].dependencies) + pytest, pinned to the venv ----
site=$root/usr/local/lib/python3.11/dist-packages
"$host_py" "$here/requirements.py" "$repo/pyproject.toml" "$out/requirements.txt" "$out/constraints.txt"
want_wheels=$(cat "$out/requirements.txt" "$out/constraints.txt" | sha256sum)
if [ "$(cat "$stamps/wheels" 2>/dev/null)" != "$want_wheels" ]; then
  log "installing aarch64 wheels: $(tr '\n' ' ' < "$out/requirements.txt")"
  rm -rf "$site" && mkdir -p "$site"
  plats=(--platform manylinux2014_aarch64)
  for v in $(seq 17 36); do plats+=(--platform "manylinux_2_${v}_aarch64"); done  # the sysroot has glibc 2.36
  pip_opts=(--quiet --disable-pip-version-check --no-warn-script-location --target "$site" --only-binary=:all:
            "${plats[@]}" --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
  if ! "$host_py" -m pip install "${pip_opts[@]}" -r "$out/requirements.txt" -c "$out/constraints.txt"; then
    # A pinned transitive dependency without an aarch64 wheel: keep the top-level pins, let pip pick the rest.
    log "constraints unsatisfiable on aarch64; retrying with the top-level pins only"
    rm -rf "$site" && mkdir -p "$site"
    "$host_py" -m pip install "${pip_opts[@]}" -r "$out/requirements.txt"
  fi
  # Precompile (cp311 bytecode is architecture-independent): halves import time under emulation.
  if command -v python3.11 >/dev/null; then
    python3.11 -m compileall -q -j2 "$root/usr/lib/python3.11" "$site" >/dev/null || true
  fi
  echo "$want_wheels" > "$stamps/wheels"
fi
log "sysroot ready: $root"
