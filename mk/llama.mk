# llama.cpp beside edgemoe under one memory cap (issue 17, items 1-2): `make bench-llama`.
# Include from the Makefile after mk/bench.mk:   include mk/llama.mk
#
# From a clean clone it:
#  1. downloads the llama-cpp-python sdist with pip (it vendors the whole llama.cpp tree: the tools, gguf-py,
#     convert_hf_to_gguf.py) and checks its sha256; only that package comes from source (the build tools pip
#     needs to read its metadata come as wheels: `--no-binary :all:` would compile CMake from source first);
#  2. builds llama-bench, llama-quantize, llama-completion, llama-simple and llama-tokenize with CMake,
#     GGML_NATIVE=OFF and an explicit ISA list (AMX off: with GGML_NATIVE=ON this VM's CPUID enables AMX and
#     every Q4 model dies with SIGILL), no curl/openssl/server/tests, `nice -n 10`, -j2 (~12 min here).
#     The build is cached under build/llama/ and never rebuilt when present (`rm -rf build/llama/build`);
#  3. installs the converter's Python needs into the venv (gguf from the vendored gguf-py, sentencepiece);
#  4. converts the default model and the large bench checkpoint to GGUF (f16, Q4_0, Q4_K_M with llama-quantize's
#     fallbacks for rows not divisible by 256) through edgemoe_ort.bench.llama, which maps our byte-level BPE
#     to llama.cpp's "gpt-2" pre-tokenizer at run time and checks the f16 GGUF's greedy tokens against
#     transformers before anything is timed (a mismatch fails the target);
#  5. runs llama.cpp (llama-bench, mmap, --repack 0, 1 thread) and edgemoe-run (1 compute thread) interleaved,
#     each in its own memory cgroup (edgemoe_ort.bench.memcap, page cache dropped before each run), at caps
#     = llama's dense + 10/25/50/100% of its expert bytes and at ours (estimate_rss) -> build/bench/llama.json
#     and build/bench/llama.md. Needs root (cgroups, drop_caches). Large bundle: build/bench/large-bundle
#     (`make bench-models` builds it the first time).

LLAMA_PY_VERSION := 0.3.36
LLAMA_SDIST_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SENTENCEPIECE_VERSION := 0.2.3
LLAMA_DIR := $(BUILD)/llama
LLAMA_SDIST := $(LLAMA_DIR)/dl/llama_cpp_python-$(LLAMA_PY_VERSION).tar.gz
LLAMA_SRC := $(LLAMA_DIR)/src/llama_cpp_python-$(LLAMA_PY_VERSION)
LLAMA_CPP := $(LLAMA_SRC)/vendor/llama.cpp
LLAMA_BIN := $(LLAMA_DIR)/build/bin
LLAMA_TOOLS := llama-bench llama-quantize llama-completion llama-simple llama-tokenize
LLAMA_MODELS := $(LLAMA_DIR)/models
LLAMA_RESULTS := $(BENCH_DIR)/llama.json
LLAMA_TABLE := $(BENCH_DIR)/llama.md
LLAMA_BENCH_ARGS ?=

# The ISA list: every x86 extension ggml can use that this CPU reports, written out (never GGML_NATIVE, never
# AMX). Override with LLAMA_ISA="-DGGML_AVX2=ON ..." to build for another CPU.
LLAMA_CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
llama_on = $(if $(strip $(foreach f,$(2),$(if $(filter $(f),$(LLAMA_CPU_FLAGS)),,missing))),-DGGML_$(1)=OFF,-DGGML_$(1)=ON)
LLAMA_ISA ?= $(call llama_on,SSE42,sse4_2) $(call llama_on,AVX,avx) $(call llama_on,AVX2,avx2) \
  $(call llama_on,BMI2,bmi2) $(call llama_on,FMA,fma) $(call llama_on,F16C,f16c) \
  $(call llama_on,AVX_VNNI,avx_vnni) $(call llama_on,AVX512,avx512f avx512cd avx512vl avx512dq avx512bw) \
  $(call llama_on,AVX512_VBMI,avx512vbmi) $(call llama_on,AVX512_VNNI,avx512_vnni) \
  $(call llama_on,AVX512_BF16,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_CMAKE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF $(LLAMA_ISA) \
  -DGGML_CCACHE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF

.PHONY: bench-llama bench-llama-1b llama-build llama-models

$(LLAMA_SDIST): | $(VENV)/.ok
	@mkdir -p $(@D)
	$(VPY) -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_PY_VERSION)" -d $(@D)
	@echo "$(LLAMA_SDIST_SHA256)  $@" | sha256sum -c --quiet - || { echo "llama.mk: $@: sha256 differs from LLAMA_SDIST_SHA256" >&2; rm -f $@; exit 1; }

$(LLAMA_SRC)/.extracted: | $(LLAMA_SDIST)
	@rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_DIR)/src
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_DIR)/src
	@test -f $(LLAMA_CPP)/convert_hf_to_gguf.py && test -d $(LLAMA_CPP)/gguf-py
	@touch $@

# Order-only: a present build is kept (no source file is a prerequisite).
$(LLAMA_BIN)/.ok: | $(BUILD)/.apt-ok $(LLAMA_SRC)/.extracted
	@load=$$(cut -d' ' -f1 /proc/loadavg); echo "llama.mk: building llama.cpp (load average $$load): $(LLAMA_ISA)"
	nice -n 10 cmake -S $(LLAMA_CPP) -B $(LLAMA_DIR)/build $(LLAMA_CMAKE_FLAGS) > $(LLAMA_DIR)/cmake-configure.log
	@start=$$(date +%s); \
	nice -n 10 cmake --build $(LLAMA_DIR)/build -j2 --target $(LLAMA_TOOLS) > $(LLAMA_DIR)/cmake-build.log 2>&1 \
	  || { tail -40 $(LLAMA_DIR)/cmake-build.log >&2; exit 1; }; \
	echo "llama.cpp build: $$(( $$(date +%s) - start )) s at -j2, load average after: $$(cat /proc/loadavg)" \
	  | tee $(LLAMA_DIR)/build-time.txt
	@for t in $(LLAMA_TOOLS); do test -x $(LLAMA_BIN)/$$t || { echo "llama.mk: $(LLAMA_BIN)/$$t missing" >&2; exit 1; }; done
	@touch $@
llama-build: $(LLAMA_BIN)/.ok

# The converter's needs, from the vendored tree (gguf-py) and PyPI (sentencepiece: imported even when unused).
$(VENV)/.llama-convert-ok: | $(VENV)/.ok $(LLAMA_SRC)/.extracted
	$(VPY) -m pip install -q "$(LLAMA_CPP)/gguf-py" "sentencepiece==$(SENTENCEPIECE_VERSION)"
	@touch $@

# GGUFs (f16, Q4_0, Q4_K_M) of the default model and of the large bench checkpoint, each f16 GGUF checked
# token for token against transformers (greedy) before anything is timed; check.json records it.
LLAMA_CONVERT := $(VPY) -m edgemoe_ort.bench.llama convert --llama-cpp $(LLAMA_CPP) --bin $(LLAMA_BIN)
$(LLAMA_MODELS)/tiny/check.json: | $(LLAMA_BIN)/.ok $(VENV)/.llama-convert-ok
	$(LLAMA_CONVERT) --hf $(DEMO_MODEL) --out $(@D)
$(LLAMA_MODELS)/large/check.json: | $(LLAMA_BIN)/.ok $(VENV)/.llama-convert-ok $(BENCH_LARGE)/manifest.json
	$(LLAMA_CONVERT) --hf $(BENCH_DIR)/large-hf --tokenizer-from $(DEMO_MODEL) --out $(@D)
llama-models: $(LLAMA_MODELS)/tiny/check.json $(LLAMA_MODELS)/large/check.json

# The 1.0 B shape of issue 17 (LARGE_CONFIG with 11 layers: 88 experts, Q4_0 experts ~520 MiB), checkpoint and
# bundle under build/llama/1b/ (exporter peak ~10 GB RSS): `make bench-llama-1b` -> build/bench/llama-1b.json.
LLAMA_1B := $(LLAMA_DIR)/1b
$(LLAMA_1B)/bundle/manifest.json: | $(VENV)/.ok $(LIB)
	nice -n 10 $(VPY) -c "from edgemoe_ort.bench.large import LARGE_CONFIG, build_large_bundle; \
	  print(build_large_bundle('$(LLAMA_1B)/hf', '$(LLAMA_1B)/bundle', config=dict(LARGE_CONFIG, num_hidden_layers=11)))"
# Its random weights give a near-tie (fp32 top-2 gap 0.0004 at the 4th token) that f16 weights cannot resolve:
# the strict check fails there, so this target opts in to the teacher-forced check that excuses only gaps
# below LLAMA_1B_TIE_MARGIN (recorded in check.json and the table); `make bench-llama` stays strict.
LLAMA_1B_TIE_MARGIN ?= 0.01
$(LLAMA_MODELS)/1b/check.json: | $(LLAMA_BIN)/.ok $(VENV)/.llama-convert-ok $(LLAMA_1B)/bundle/manifest.json
	$(LLAMA_CONVERT) --hf $(LLAMA_1B)/hf --tokenizer-from $(DEMO_MODEL) --out $(@D) --tie-margin $(LLAMA_1B_TIE_MARGIN)

bench-llama-1b: $(LLAMA_MODELS)/tiny/check.json $(LLAMA_MODELS)/1b/check.json | $(LIB)
	$(VPY) -m edgemoe_ort.bench.llama bench --bin $(LLAMA_BIN) --gguf $(LLAMA_MODELS)/1b/Q4_0.gguf \
	  --check $(LLAMA_MODELS)/1b/check.json --bundle $(LLAMA_1B)/bundle --out $(BENCH_DIR)/llama-1b.json \
	  --markdown $(BENCH_DIR)/llama-1b.md $(LLAMA_BENCH_ARGS)
	@cat $(BENCH_DIR)/llama-1b.md

# The 1.0 B shape with int4 dense weights too (like llama.cpp's Q4_0 file): `make bench-llama-1b-d4`.
$(LLAMA_1B)/bundle-d4/manifest.json: | $(VENV)/.ok $(LLAMA_1B)/bundle/manifest.json
	$(VENV)/bin/edgemoe-export $(LLAMA_1B)/hf -o $(LLAMA_1B)/bundle-d4 --bits 4 --group-size 64 \
	  --dense-bits 4 --force --quiet

.PHONY: bench-llama-1b-d4
bench-llama-1b-d4: $(LLAMA_MODELS)/tiny/check.json $(LLAMA_MODELS)/1b/check.json \
  $(LLAMA_1B)/bundle-d4/manifest.json | $(LIB)
	$(LLAMA_WARN_LOAD)
	$(VPY) -m edgemoe_ort.bench.llama bench --bin $(LLAMA_BIN) --gguf $(LLAMA_MODELS)/1b/Q4_0.gguf \
	  --check $(LLAMA_MODELS)/1b/check.json --bundle $(LLAMA_1B)/bundle-d4 --out $(BENCH_DIR)/llama-1b-d4.json \
	  --markdown $(BENCH_DIR)/llama-1b-d4.md $(LLAMA_BENCH_ARGS)
	@cat $(BENCH_DIR)/llama-1b-d4.md

# The large checkpoint exported with int4 dense weights too (--dense-bits 4, issue 13): llama.cpp's Q4_0 file
# quantizes its dense tensors, so this is the like-for-like bundle; `make bench-llama` runs both.
BENCH_LARGE_D4 := $(BENCH_DIR)/large-d4-bundle
$(BENCH_LARGE_D4)/manifest.json: | $(VENV)/.ok $(BENCH_LARGE)/manifest.json
	$(VENV)/bin/edgemoe-export $(BENCH_DIR)/large-hf -o $(BENCH_LARGE_D4) --bits 4 --group-size 64 \
	  --dense-bits 4 --force --quiet

LLAMA_WARN_LOAD = @load=$$(cut -d' ' -f1 /proc/loadavg); \
	if awk "BEGIN{exit !($$load >= 1.5)}"; then \
	  echo "bench-llama: WARNING: load average $$load >= 1.5: other work is running, the figures will be noisy"; fi

.PHONY: bench-llama-fp32 bench-llama-d4
bench-llama-fp32: llama-models | $(LIB)
	$(LLAMA_WARN_LOAD)
	$(VPY) -m edgemoe_ort.bench.llama bench --bin $(LLAMA_BIN) --gguf $(LLAMA_MODELS)/large/Q4_0.gguf \
	  --check $(LLAMA_MODELS)/large/check.json --bundle $(BENCH_LARGE) --out $(LLAMA_RESULTS) \
	  --markdown $(LLAMA_TABLE) $(LLAMA_BENCH_ARGS)
	@cat $(LLAMA_TABLE)

bench-llama-d4: llama-models $(BENCH_LARGE_D4)/manifest.json | $(LIB)
	$(LLAMA_WARN_LOAD)
	$(VPY) -m edgemoe_ort.bench.llama bench --bin $(LLAMA_BIN) --gguf $(LLAMA_MODELS)/large/Q4_0.gguf \
	  --check $(LLAMA_MODELS)/large/check.json --bundle $(BENCH_LARGE_D4) --out $(BENCH_DIR)/llama-d4.json \
	  --markdown $(BENCH_DIR)/llama-d4.md $(LLAMA_BENCH_ARGS)
	@cat $(BENCH_DIR)/llama-d4.md

bench-llama: bench-llama-fp32 bench-llama-d4
