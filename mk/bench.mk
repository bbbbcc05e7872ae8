# Benchmarks (issue "Benchmarks side by side"): `make bench` regenerates docs/benchmarks.md and
# docs/img/bench-*.png. Include from the Makefile after its own variables:   include mk/bench.mk
#
# Built once under build/bench/ (never committed; `make clean` removes them):
#   large-hf/, large-bundle/  Mixtral-architecture random model, int4 store 1.16 GB (edgemoe_ort/bench/large.py),
#                             exported with export_model (8 min here; the exporter peaks at ~20 GB RSS: it loads fp32)
#   tiny-bundle/              the default model (models/edgemoe-tiny-mixtral) exported at int4 g64 (export_model)
#   trace.npz                 routing of the default model (models/edgemoe-tiny-mixtral) over 64 greedy tokens
#   replay-bundle/            24 layers of large synthetic experts (H 1024, I 3584, int4) the trace is replayed into
#   kernel-bundle/            one layer, 2 experts at H 4096, I 14336, int4 g64 (kernel micro-benchmark)
#   tiny-bundle/profile.json  the default model's routing profile (edgemoe-profile, 100k tokens of its corpus)
#   large-bundle/profile.json the large model's routing profile: 20k random token ids (edgemoe-profile --ids; it
#                             has no tokenizer, and random weights make any text random to it), its fitted probes
#   tiny-twins-bundle/        the default model, int4 g64 experts with int2 twins (--twin int2) + its profile
#   large-twins-bundle/       the large model, int4 g64 experts with int2 twins (~3 min): its ablation
#   tiny-plan-bundle/         the default model with edgemoe-plan's bitwidths (int4..int2 at 0.2 %) and int2
#                             twins + its profile (edgemoe_ort/bench/plan_bundle.py; ~1 min): the ablation's plan step
# `make bench` measures for ~40 min once the models exist (the large exports add ~4-8 min each, the replay and
# plan bundles ~1 min each):
# every run compares the cache policies $(BENCH_POLICIES) (one mode edgemoe[P]@budget each, interleaved) and
# measures each mode's peak RSS in a fresh process over $(BENCH_RSS_TOKENS) decode tokens.
# Measure on a quiet machine: the recipe warns when the 1-minute load average is >= 1.5.

BENCH_DIR := $(BUILD)/bench
BENCH_SMALL := $(BENCH_DIR)/tiny-bundle
BENCH_LARGE := $(BENCH_DIR)/large-bundle
BENCH_TRACE := $(BENCH_DIR)/trace.npz
BENCH_REPLAY := $(BENCH_DIR)/replay-bundle
BENCH_KERNEL := $(BENCH_DIR)/kernel-bundle
BENCH_TWINS := $(BENCH_DIR)/tiny-twins-bundle
BENCH_PLAN := $(BENCH_DIR)/tiny-plan-bundle
BENCH_LARGE_TWINS := $(BENCH_DIR)/large-twins-bundle
BENCH_RESULTS := $(BENCH_DIR)/results.json
BENCH_POLICIES ?= lru,lfu,edgemoe,hobbit
BENCH_RSS_TOKENS ?= 64
BENCH_ARGS ?=

.PHONY: bench bench-models bench-report

# Order-only on the venv: editing the Python sources does not re-export the 1 GiB model.
$(BENCH_LARGE)/manifest.json: | $(VENV)/.ok
	@mkdir -p $(BENCH_DIR)
	/usr/bin/time -v $(VPY) -m edgemoe_ort.bench.large $(BENCH_DIR)/large-hf $(BENCH_LARGE) \
	  2> >(tee $(BENCH_DIR)/large-build.log | grep -E 'Elapsed|Maximum resident' >&2)

$(BENCH_SMALL)/manifest.json: $(shell find $(DEMO_MODEL) -type f 2>/dev/null) | $(VENV)/.ok
	$(VPY) -c "from edgemoe_ort.export import export_model; \
	  export_model('$(DEMO_MODEL)', '$(BENCH_SMALL)', bits=4, group_size=64, force=True)"

$(BENCH_TRACE): $(BENCH_SMALL)/manifest.json | $(LIB)
	$(VPY) -m edgemoe_ort.bench.trace record $(BENCH_SMALL) $@ --tokens 64

$(BENCH_REPLAY)/manifest.json: $(BENCH_TRACE)
	$(VPY) -m edgemoe_ort.bench.trace replay-bundle $(BENCH_TRACE) $(BENCH_REPLAY) \
	  --hidden 1024 --intermediate 3584 --layers 24

# Prefetch inputs (stacked gates, TokenPrefetch) and CacheAwareTopK for bundles exported before they existed
# (idempotent), and the default model's routing profile (100k tokens of its corpus; edgemoe-profile's library call).
$(BENCH_DIR)/.wired: $(BENCH_SMALL)/manifest.json $(BENCH_LARGE)/manifest.json edgemoe_ort/bundle/wiring.py \
  edgemoe_ort/bundle/routing.py edgemoe_ort/bundle/residual.py edgemoe_ort/bundle/graph.py | $(LIB)
	$(VPY) -c "from edgemoe_ort.bundle.wiring import wire_bundle; \
	  [print(b, r, w.summary()) for b in ('$(BENCH_SMALL)', '$(BENCH_LARGE)') for r, w in wire_bundle(b).items()]"
	@touch $@

# The default model's routing profile of bundle $(1): 100k tokens of its corpus (edgemoe-profile's library call).
define profile_default
$(VPY) -c "import sys; sys.path.insert(0, '.'); \
  from models.eval_default import list_corpus_files, stdlib_root; \
  from edgemoe_ort.profile import profile_bundle, write_profile; \
  root = stdlib_root(); files = [root / r for r in list_corpus_files(root)]; \
  write_profile('$(1)', profile_bundle('$(1)', files, tokens=100_000), force=True)"
endef

$(BENCH_SMALL)/profile.json: $(BENCH_DIR)/.wired
	$(call profile_default,$(BENCH_SMALL))

$(BENCH_LARGE)/profile.json: $(BENCH_DIR)/.wired
	$(VPY) -c "import numpy as np; from edgemoe_ort.bundle import Bundle; \
	  from edgemoe_ort.profile import profile_bundle, write_profile; \
	  ids = np.random.default_rng(1).integers(3, Bundle.open('$(BENCH_LARGE)').config['vocab_size'], size=20_000); \
	  write_profile('$(BENCH_LARGE)', profile_bundle('$(BENCH_LARGE)', ['random ids (seed 1)'], tokens=20_000, \
	  ids=ids), force=True)"

$(BENCH_TWINS)/manifest.json: $(shell find $(DEMO_MODEL) -type f 2>/dev/null) | $(VENV)/.ok
	$(VPY) -c "from edgemoe_ort.export import export_model; \
	  export_model('$(DEMO_MODEL)', '$(BENCH_TWINS)', bits=4, group_size=64, twin='int2', force=True)"

$(BENCH_TWINS)/profile.json: $(BENCH_TWINS)/manifest.json | $(LIB)
	$(call profile_default,$(BENCH_TWINS))

$(BENCH_LARGE_TWINS)/manifest.json: | $(BENCH_LARGE)/manifest.json
	$(VPY) -c "from edgemoe_ort.export import export_model; \
	  export_model('$(BENCH_DIR)/large-hf', '$(BENCH_LARGE_TWINS)', bits=4, group_size=64, twin='int2', force=True)"

$(BENCH_PLAN)/manifest.json: $(shell find $(DEMO_MODEL) -type f 2>/dev/null) edgemoe_ort/bench/plan_bundle.py | $(VENV)/.ok
	$(VPY) -m edgemoe_ort.bench.plan_bundle $(DEMO_MODEL) $(BENCH_PLAN)

$(BENCH_PLAN)/profile.json: $(BENCH_PLAN)/manifest.json | $(LIB)
	$(call profile_default,$(BENCH_PLAN))

bench-models: $(LIB) $(BENCH_SMALL)/manifest.json $(BENCH_LARGE)/manifest.json $(BENCH_REPLAY)/manifest.json \
  $(BENCH_DIR)/.wired $(BENCH_SMALL)/profile.json $(BENCH_LARGE)/profile.json $(BENCH_TWINS)/profile.json \
  $(BENCH_PLAN)/profile.json \
  $(BENCH_LARGE_TWINS)/manifest.json

bench: bench-models
	@load=$$(cut -d' ' -f1 /proc/loadavg); \
	if awk "BEGIN{exit !($$load >= 1.5)}"; then \
	  echo "bench: WARNING: load average $$load >= 1.5: other work is running, the figures will be noisy"; fi
	$(VPY) -m edgemoe_ort.bench.suite --out $(BENCH_RESULTS) --small $(BENCH_SMALL) --large $(BENCH_LARGE) \
	  --replay $(BENCH_REPLAY) --trace $(BENCH_TRACE) --kernel-bundle $(BENCH_KERNEL) --twins $(BENCH_TWINS) \
	  --plan-twins $(BENCH_PLAN) --large-twins $(BENCH_LARGE_TWINS) \
	  --policies=$(BENCH_POLICIES) --rss-tokens=$(BENCH_RSS_TOKENS) $(BENCH_ARGS)
	$(VPY) -m edgemoe_ort.bench.report $(BENCH_RESULTS) docs/benchmarks.md docs/img

bench-report:
	$(VPY) -m edgemoe_ort.bench.report $(BENCH_RESULTS) docs/benchmarks.md docs/img
