#!/usr/bin/env bash
# Run the aarch64 lane's tests under qemu-aarch64 (called by `make test-aarch64`, once the cross build, the
# sysroot and the x86 references exist):
#   1. the cross-built C++ tests (ctest; test_kernels asserts the default dispatch is "neon" and checks the
#      scalar and NEON kernels against its reference),
#   2. pytest in the arm64 sysroot Python with the aarch64 library: the op tests (tests/test_op_*.py) and
#      tests/test_aarch64_lane.py (kernel path, default model vs x86 greedy tokens / logits).
# Both run at once (each is mostly one emulated thread); ctest's output follows pytest's.
# usage: run-lane.sh A64_DIR (build/aarch64) [extra pytest arguments]
set -euo pipefail
a64=$(cd "$1" && pwd)
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export QEMU_CPU=${EDGEMOE_QEMU_CPU:-cortex-a76}  # the same CPU for ctest's emulator and the launcher
unset EDGEMOE_KERNEL                            # the default dispatch is what the lane checks
start=$SECONDS

ctest_log=$a64/ctest.log
(cd "$a64/customops" && ctest --output-on-failure > "$ctest_log" 2>&1) &
ctest_pid=$!

echo "== aarch64: pytest under qemu-aarch64 ($QEMU_CPU, sysroot python3.11, ${a64#"$repo"/}/customops library)"
cd "$repo"
shopt -s nullglob
tests=(tests/test_aarch64_*.py tests/test_op_*.py)
pytest_rc=0
EDGEMOE_CUSTOMOPS_LIB="$a64/customops/libedgemoe_customops.so" \
EDGEMOE_AARCH64_REFS="$a64/refs" \
PYTHONPATH="$repo" \
  "$here/python3" -m pytest -q -p no:cacheprovider -m "not export" -rsP "${tests[@]}" "$@" || pytest_rc=$?
pytest_s=$((SECONDS - start))

ctest_rc=0
wait "$ctest_pid" || ctest_rc=$?
echo "== aarch64: C++ tests under qemu-aarch64 ($QEMU_CPU)"
cat "$ctest_log"
grep -hE "^(kernel_path|kernels:|max relative)" "$a64/customops/Testing/Temporary/LastTest.log" || true
echo "== aarch64 lane: pytest ${pytest_s} s, all $((SECONDS - start)) s (ctest rc $ctest_rc, pytest rc $pytest_rc)"
[ "$ctest_rc" -eq 0 ] && [ "$pytest_rc" -eq 0 ]
