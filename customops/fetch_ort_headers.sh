#!/usr/bin/env bash
# Find or fetch the ONNX Runtime C/C++ headers (the onnxruntime pip wheel ships none).
# Order: $ORT_INCLUDE_DIR, the system (/usr/include/onnxruntime, /usr/local/include/onnxruntime), a copy this
# script fetched before into OUT, then Debian trixie's libonnxruntime-dev fetched through a private apt
# configuration (the system's sources, lists and cache are untouched). The apt mirror is the system's own:
# the first Debian archive (not a -security one) in /etc/apt/sources.list.d/*.sources (deb822) or in
# /etc/apt/sources.list / sources.list.d/*.list (one-line); $EDGEMOE_APT_MIRROR overrides it.
# Prints the include directory on stdout (progress and errors go to stderr). CMake runs this script when it is
# given no ORT_INCLUDE_DIR (customops/CMakeLists.txt); the Makefile runs it into build/ort-headers.
#   usage: fetch_ort_headers.sh [OUT]     (default build/ort-headers)
set -euo pipefail
out=${1:-build/ort-headers}
has() { [ -f "$1/onnxruntime_cxx_api.h" ] && [ -f "$1/onnxruntime_lite_custom_op.h" ]; }
if [ -n "${ORT_INCLUDE_DIR:-}" ]; then
  has "$ORT_INCLUDE_DIR" || { echo "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR has no onnxruntime_cxx_api.h" >&2; exit 1; }
  echo "$ORT_INCLUDE_DIR"; exit 0
fi
for d in /usr/include/onnxruntime /usr/local/include/onnxruntime; do
  if has "$d"; then echo "$d"; exit 0; fi
done
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: apt is given paths below, and CMake passes any
inc="$out/root/usr/include/onnxruntime"
if has "$inc"; then echo "$inc"; exit 0; fi

# One fetch at a time per OUT (a `make` and a `pip wheel` may run together); the winner's copy serves the other.
if command -v flock >/dev/null; then
  exec 9>"$out/.lock"
  flock 9
  if has "$inc"; then echo "$inc"; exit 0; fi
fi

# The system's Debian mirror and its keyring: "URI KEYRING" of the first usable entry.
system_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822: stanzas separated by blank lines; fields Types, URIs, Suites, Signed-By (a path here).
    awk '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && uri != "" && uri !~ /^cdrom:/ && suites != "" && !all_security) {
          print uri, (signed == "" ? "-" : signed); found = 1; exit
        }
        types = uri = suites = signed = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      tolower($1) == "types:" { $1 = ""; types = $0 }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "signed-by:" && $2 ~ /^\// { signed = $2 }
      tolower($1) == "enabled:" && tolower($2) == "no" { types = "" }
      tolower($1) == "suites:" {
        suites = $2; all_security = 1
        for (i = 2; i <= NF; i++) if ($i !~ /-security$/) all_security = 0
      }
      END { if (!found) flush() }
    ' "$f" | head -n 1
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # one-line: deb [opts] URI suite components...
    awk '
      $1 != "deb" { next }
      {
        signed = "-"; i = 2
        if ($2 ~ /^\[/) {
          for (; i <= NF; i++) {
            if ($i ~ /^\[?signed-by=/) { s = $i; sub(/^\[?signed-by=/, "", s); sub(/\]$/, "", s); signed = s }
            if ($i ~ /\]$/) { i++; break }
          }
        }
        uri = $i; suite = $(i + 1)
        if (uri ~ /^cdrom:/ || suite ~ /-security$/) next
        print uri, signed; exit
      }
    ' "$f" | head -n 1
  done
}
read -r mirror keyring < <(system_mirror | head -n 1) || true
mirror=${EDGEMOE_APT_MIRROR:-${mirror:-}}
if [ -z "$mirror" ]; then
  echo "fetch_ort_headers.sh: no Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list;" \
       "set EDGEMOE_APT_MIRROR, or ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h" >&2
  exit 1
fi
if [ -z "${keyring:-}" ] || [ "$keyring" = "-" ] || [ ! -r "$keyring" ]; then
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
fi
echo "fetch_ort_headers.sh: fetching libonnxruntime-dev (Debian trixie) from $mirror into $out" >&2

mkdir -p "$out/apt/lists/partial" "$out/apt/cache/archives/partial" "$out/apt/sp"
{
  echo "Types: deb"
  echo "URIs: $mirror"
  echo "Suites: trixie"
  echo "Components: main"
  if [ -r "$keyring" ]; then echo "Signed-By: $keyring"; fi
} > "$out/apt/sp/trixie.sources"
o=(-oDir::Etc::SourceList=/dev/null -oDir::Etc::SourceParts="$out/apt/sp" -oDir::State::Lists="$out/apt/lists"
   -oDir::Cache="$out/apt/cache" -oDebug::NoLocking=1)
# As root apt would hand the download to its _apt user, who may not write into OUT (and warns): stay root.
if [ "$(id -u)" -eq 0 ]; then o+=(-oAPT::Sandbox::User=root); fi
fail() {
  echo "fetch_ort_headers.sh: could not fetch libonnxruntime-dev from $mirror (suite trixie): install your" \
       "distribution's libonnxruntime-dev, or set ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h" >&2
  exit 1
}
apt-get "${o[@]}" -qq update >&2 || fail
rm -f "$out"/libonnxruntime-dev_*.deb
(cd "$out" && apt-get "${o[@]}" -qq download libonnxruntime-dev >&2) || fail
rm -rf "$out/root.tmp"
dpkg -x "$out"/libonnxruntime-dev_*.deb "$out/root.tmp"
has "$out/root.tmp/usr/include/onnxruntime" || { echo "libonnxruntime-dev unpacked without headers" >&2; exit 1; }
rm -rf "$out/root" && mv "$out/root.tmp" "$out/root"
rm -rf "$out/apt/lists" "$out/apt/cache"  # ~20 MB of package lists, needed no more
echo "$inc"
