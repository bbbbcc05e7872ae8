#!/usr/bin/env bash
# Find or fetch the ONNX Runtime C/C++ headers (the onnxruntime pip wheel ships none).
# Order: $ORT_INCLUDE_DIR, the system (/usr/include/onnxruntime), then Debian trixie's
# libonnxruntime-dev fetched through a private apt configuration (the system's sources are untouched).
# Prints the include directory on stdout.
set -euo pipefail
out=${1:-build/ort-headers}
has() { [ -f "$1/onnxruntime_cxx_api.h" ] && [ -f "$1/onnxruntime_lite_custom_op.h" ]; }
if [ -n "${ORT_INCLUDE_DIR:-}" ]; then
  has "$ORT_INCLUDE_DIR" || { echo "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR has no onnxruntime_cxx_api.h" >&2; exit 1; }
  echo "$ORT_INCLUDE_DIR"; exit 0
fi
for d in /usr/include/onnxruntime /usr/local/include/onnxruntime "$out/root/usr/include/onnxruntime"; do
  if has "$d"; then echo "$d"; exit 0; fi
done
mkdir -p "$out/apt/lists/partial" "$out/apt/sp"
cat > "$out/apt/sp/trixie.sources" <<'X'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
X
o=(-oDir::Etc::SourceList=/dev/null -oDir::Etc::SourceParts="$PWD/$out/apt/sp" -oDir::State::Lists="$PWD/$out/apt/lists" -oDebug::NoLocking=1)
apt-get "${o[@]}" -qq update >&2
(cd "$out" && apt-get "${o[@]}" -qq download libonnxruntime-dev >&2)
dpkg -x "$out"/libonnxruntime-dev_*.deb "$out/root"
has "$out/root/usr/include/onnxruntime" || { echo "libonnxruntime-dev unpacked without headers" >&2; exit 1; }
echo "$PWD/$out/root/usr/include/onnxruntime"
