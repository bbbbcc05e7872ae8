# edgemoe-ort — everything a fresh Debian 12 machine needs is installed from here.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
BUILD := build
LIB := edgemoe_ort/_lib/libedgemoe_customops.so
APT_PKGS := cmake g++ libxxhash-dev nlohmann-json3-dev
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all setup apt venv lib wheel test test-asan lint demo quality clean

all: lib

# --- set-up -----------------------------------------------------------------
$(BUILD)/.apt-ok:
	@mkdir -p $(BUILD)
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@
apt: $(BUILD)/.apt-ok

# The editable install runs no CMake (pyproject.toml's editable override): the library is `make lib`'s, and
# profiles/ + export/ are read from the repository (edgemoe_ort/resources.py).
$(VENV)/.ok: pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[export,dev,ortx]"
	@touch $@
venv: $(VENV)/.ok

# ONNX Runtime headers: $ORT_INCLUDE_DIR, the system's, else fetched from the system's apt mirror. CMake runs
# the same script itself when it is given no ORT_INCLUDE_DIR (`pip install .`).
$(BUILD)/ort-include.txt: customops/fetch_ort_headers.sh
	@mkdir -p $(BUILD)
	./customops/fetch_ort_headers.sh $(BUILD)/ort-headers > $@.tmp && mv $@.tmp $@

# The library of customops/CMakeLists.txt, configured as the wheel's (Release; pyproject.toml [tool.scikit-build]),
# plus the C++ tests and fuzz driver that the wheel leaves out.
$(LIB): $(BUILD)/.apt-ok $(BUILD)/ort-include.txt $(shell find customops -type f \( -name '*.cc' -o -name '*.h' -o -name 'CMakeLists.txt' \) 2>/dev/null)
	cmake -S customops -B $(BUILD)/customops -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR=$$(cat $(BUILD)/ort-include.txt) >/dev/null
	cmake --build $(BUILD)/customops -j2
	@mkdir -p edgemoe_ort/_lib
	cp $(BUILD)/customops/libedgemoe_customops.so $(LIB).tmp && mv -f $(LIB).tmp $(LIB)  # new inode: running processes keep the old one
lib: $(LIB)

# The wheel (library, profiles, recipes inside; tests/test_wheel.py builds the same, in the same build folder;
# without build isolation, which would make scikit-build-core start that folder afresh: the venv has it).
WHEEL_DIR := $(BUILD)/dist
wheel: $(BUILD)/.apt-ok venv
	flock $(BUILD)/wheel.lock $(VPY) -m pip wheel . --no-deps --no-build-isolation -w $(WHEEL_DIR) -Cbuild-dir=$(BUILD)/wheel \
	  -Ccmake.define.EDGEMOE_ORT_FETCH_DIR=$(CURDIR)/$(BUILD)/ort-headers

setup: venv lib

# --- the main job -----------------------------------------------------------
DEMO_MODEL := models/edgemoe-tiny-mixtral
DEMO_BUNDLE := $(BUILD)/demo-bundle
DEMO_PROMPT ?= def fibonacci(n):

$(DEMO_BUNDLE)/manifest.json: $(VENV)/.ok $(shell find $(DEMO_MODEL) -type f 2>/dev/null) edgemoe_ort/export/*.py
	$(VENV)/bin/edgemoe-export $(DEMO_MODEL) -o $(DEMO_BUNDLE) --bits 4 --force

demo: setup $(DEMO_BUNDLE)/manifest.json
	$(VENV)/bin/edgemoe-inspect $(DEMO_BUNDLE)
	$(VENV)/bin/edgemoe-run $(DEMO_BUNDLE) --prompt "$(DEMO_PROMPT)" --max-new-tokens 64 --budget 25% --io direct

# --- tests ------------------------------------------------------------------
# pytest exits 5 when it collected no test: that is a failure here, never hidden.
test: setup
	$(VPY) -m pytest -q -rs tests
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory test-aarch64

test-asan: $(BUILD)/.apt-ok $(BUILD)/ort-include.txt venv
	cmake -S customops -B $(BUILD)/asan -DCMAKE_BUILD_TYPE=Debug -DEDGEMOE_SANITIZE=ON -DORT_INCLUDE_DIR=$$(cat $(BUILD)/ort-include.txt) >/dev/null
	cmake --build $(BUILD)/asan -j2
	cd $(BUILD)/asan && ctest --output-on-failure

lint: venv
	$(VENV)/bin/ruff check edgemoe_ort tests export scripts models

# Quality of the default model's bundles at fp32/fp16/int8/int4 -> docs/quality.md
quality: setup
	$(VPY) scripts/quality_report.py --tokens 32768

clean:
	rm -rf $(BUILD) edgemoe_ort/_lib

include mk/aarch64.mk
include mk/bench.mk
include mk/llama.mk
include mk/fuzz.mk
include mk/export-bench.mk
