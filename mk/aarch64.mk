# aarch64 lane: cross-build the op library with Debian's g++-aarch64-linux-gnu and test it under
# qemu-aarch64 user-mode emulation (CI is x86; this is how it sees aarch64). Included from the Makefile
# after its own variables (BUILD, VENV, VPY, LIB, DEMO_MODEL, DEMO_BUNDLE). Everything is cached under
# $(A64): a second run only re-runs the tests.
#   make test-aarch64        C++ tests + op tests + default model vs x86 (greedy tokens, logits), all emulated
#   make lib-aarch64         just the cross-built library ($(A64_LIB))

A64 := $(BUILD)/aarch64
A64_LIB := $(A64)/customops/libedgemoe_customops.so
A64_APT_PKGS := g++-aarch64-linux-gnu qemu-user
A64_REFS := $(A64)/refs/int4.npz $(A64)/refs/fp32.npz
A64_FP32_BUNDLE := $(A64)/bundle-fp32

.PHONY: test-aarch64 lib-aarch64 sysroot-aarch64

$(A64)/.apt-ok:
	@mkdir -p $(A64)
	@missing=""; for p in $(A64_APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@

# arm64 python3.11 + aarch64 wheels pinned to the venv's versions (the script skips what is up to date).
$(A64)/.sysroot-ok: $(A64)/.apt-ok $(VENV)/.ok pyproject.toml \
                    scripts/aarch64/setup-sysroot.sh scripts/aarch64/requirements.py
	scripts/aarch64/setup-sysroot.sh $(A64) $(VPY)
	@touch $@
sysroot-aarch64: $(A64)/.sysroot-ok

A64_SOURCES := $(shell find customops -type f \( -name '*.cc' -o -name '*.h' -o -name '*.cmake' -o -name 'CMakeLists.txt' \) 2>/dev/null)
$(A64_LIB): $(A64)/.apt-ok $(BUILD)/.apt-ok $(BUILD)/ort-include.txt $(A64_SOURCES)
	cmake -S customops -B $(A64)/customops -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_TOOLCHAIN_FILE=$(CURDIR)/customops/cmake/aarch64-toolchain.cmake \
	  -DORT_INCLUDE_DIR=$$(cat $(BUILD)/ort-include.txt) >/dev/null
	cmake --build $(A64)/customops -j2
	@touch $@
lib-aarch64: $(A64_LIB)

# The default model's bundles, exported on x86 (int4 is the demo bundle), and x86 greedy tokens + logits.
$(A64_FP32_BUNDLE)/manifest.json: $(VENV)/.ok $(shell find $(DEMO_MODEL) -type f 2>/dev/null) edgemoe_ort/export/*.py
	$(VENV)/bin/edgemoe-export $(DEMO_MODEL) -o $(A64_FP32_BUNDLE) --bits 32 --force

A64_REF_DEPS := $(LIB) scripts/aarch64/make_reference.py $(wildcard edgemoe_ort/runtime/*.py edgemoe_ort/bundle/*.py)
$(A64)/refs/int4.npz: $(DEMO_BUNDLE)/manifest.json $(A64_REF_DEPS)
	@mkdir -p $(@D)
	$(VPY) scripts/aarch64/make_reference.py $@ $(DEMO_BUNDLE)
$(A64)/refs/fp32.npz: $(A64_FP32_BUNDLE)/manifest.json $(A64_REF_DEPS)
	@mkdir -p $(@D)
	$(VPY) scripts/aarch64/make_reference.py $@ $(A64_FP32_BUNDLE)

test-aarch64: $(A64_LIB) $(A64)/.sysroot-ok $(A64_REFS)
	scripts/aarch64/run-lane.sh $(A64)
