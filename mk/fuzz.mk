# Fuzzing of the bundle readers (issue 15; tests/fuzz/run.py has the details). Include from the Makefile after its
# own variables:   include mk/fuzz.mk
#
# `make fuzz` sends FUZZ_CASES seeded manifest + store mutations (cases (FUZZ_SEED, 0..FUZZ_CASES-1)) through every
# reader, FUZZ_JOBS worker processes each: the Python reader (Bundle.open + every record verified), the ONNX
# Runtime C-host path (plain onnxruntime, the op library registered, one forward pass), the native driver of the
# release build (build/customops/fuzz_reader) and the same driver under ASan + UBSan (build/asan/fuzz_reader).
# It fails on a crash, a hang (FUZZ_TIMEOUT s per case), a case that grows a reader's memory by more than 256 MiB,
# an exception other than the reader's own, or a disagreement of the two validators that tests/fuzz/known.py
# does not list. The report: $(FUZZ_OUT) (kept cases and minimized examples beside it, in <report>-cases/).
# 100k cases take ~30-40 min on 2 cores.

FUZZ_CASES ?= 100000
FUZZ_SEED ?= 1
FUZZ_JOBS ?= 2
FUZZ_TIMEOUT ?= 10
FUZZ_OUT ?= $(BUILD)/fuzz/report.json
FUZZ_ARGS ?=

.PHONY: fuzz

fuzz: setup
	cmake --build $(BUILD)/customops -j2 --target fuzz_reader
	cmake -S customops -B $(BUILD)/asan -DCMAKE_BUILD_TYPE=Debug -DEDGEMOE_SANITIZE=ON -DORT_INCLUDE_DIR=$$(cat $(BUILD)/ort-include.txt) >/dev/null
	cmake --build $(BUILD)/asan -j2 --target fuzz_reader
	@mkdir -p $(dir $(FUZZ_OUT))
	$(VPY) -m tests.fuzz.run --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --jobs $(FUZZ_JOBS) --timeout $(FUZZ_TIMEOUT) \
	  --asan --out $(FUZZ_OUT) $(FUZZ_ARGS)
