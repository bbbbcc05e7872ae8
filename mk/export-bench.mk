# Exporter benchmark (issue 13): peak RSS and wall time of a streamed export (edgemoe_ort/bench/export_bench.py).
# Not part of `make test` / `make bench`. Include from the Makefile after mk/bench.mk (uses BENCH_DIR):
#   include mk/export-bench.mk
#
#   make export-bench      both models below, streamed (the default path), int4 g64
#   make export-bench-x8 / export-bench-large      one of them
#
# Built once under build/bench/ (never committed):
#   x8-hf/                random bf16 checkpoint with Mixtral-8x7B's expert shapes (H 4096, I 14336, 8 experts),
#                         3 layers, vocab 8192: 8.5 GB on disk, written tensor by tensor (~2 GB of RAM)
#   x8-bundle/            its bundle;  x8-export.json: peak RSS / time of the export (/usr/bin/time -v)
#   large-hf/             the benchmarks' 1 GiB-store model (shared with mk/bench.mk, built here if missing)
#   large-stream-bundle/  its bundle (build/bench/large-bundle, which the benchmarks use, is left alone);
#                         large-export.json: peak RSS / time of the export
# Every measurement re-runs (the targets are phony); the checkpoints are built only if missing.
# EXPORT_BENCH_ARGS=--no-stream measures the in-memory path instead (x8: > 20 GB of RAM; not by default).

X8_HF := $(BENCH_DIR)/x8-hf
X8_BUNDLE := $(BENCH_DIR)/x8-bundle
LARGE_HF := $(BENCH_DIR)/large-hf
LARGE_STREAM_BUNDLE := $(BENCH_DIR)/large-stream-bundle
EXPORT_BENCH_ARGS ?=

.PHONY: export-bench export-bench-x8 export-bench-large

$(X8_HF)/config.json: | $(VENV)/.ok
	@mkdir -p $(BENCH_DIR)
	$(VPY) -m edgemoe_ort.bench.export_bench checkpoint $(X8_HF) --preset x8

# mk/bench.mk builds large-hf inside its large-bundle recipe; this builds only the checkpoint, the same way
$(LARGE_HF)/config.json: | $(VENV)/.ok
	@mkdir -p $(BENCH_DIR)
	$(VPY) -m edgemoe_ort.bench.export_bench checkpoint $(LARGE_HF) --preset large

export-bench-x8: $(X8_HF)/config.json
	$(VPY) -m edgemoe_ort.bench.export_bench measure $(X8_HF) $(X8_BUNDLE) --preset x8 \
	  --out $(BENCH_DIR)/x8-export.json $(EXPORT_BENCH_ARGS)

export-bench-large: $(LARGE_HF)/config.json
	$(VPY) -m edgemoe_ort.bench.export_bench measure $(LARGE_HF) $(LARGE_STREAM_BUNDLE) --preset large \
	  --out $(BENCH_DIR)/large-export.json $(EXPORT_BENCH_ARGS)

export-bench: export-bench-large export-bench-x8
