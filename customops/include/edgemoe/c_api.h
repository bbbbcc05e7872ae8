/* C API of libedgemoe_customops.so besides RegisterCustomOps (docs/op-contract.md, "Statistics"). */
#ifndef EDGEMOE_C_API_H
#define EDGEMOE_C_API_H
#include <stdint.h>

#if defined(_WIN32)
#define EDGEMOE_EXPORT __declspec(dllexport)
#else
#define EDGEMOE_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Writes the counters of store `store_id` as a NUL-terminated JSON object into buf and returns the JSON's
   length n (without the NUL). Nothing is written if len < n + 1 (the caller retries with n + 1 bytes).
   Returns -1 for an unknown store id. */
EDGEMOE_EXPORT int64_t edgemoe_store_stats_json(const char* store_id, char* buf, int64_t len);
/* Zeroes the counters of `store_id` (peak_resident_bytes := resident_bytes). Unknown ids are ignored. */
EDGEMOE_EXPORT void edgemoe_store_reset_stats(const char* store_id);
/* The edgemoe.* session config keys as a JSON array [{"key", "default", "doc", "required"}, ...], written like
   edgemoe_store_stats_json (returns the length n; writes only if len >= n + 1). -1 on failure. */
EDGEMOE_EXPORT int64_t edgemoe_config_keys_json(char* buf, int64_t len);
/* The cache policies as a JSON array [{"name", "doc"}, ...], written the same way. */
EDGEMOE_EXPORT int64_t edgemoe_policies_json(char* buf, int64_t len);
/* The bundle readers' limits (manifest.h reader_limits()): [{"name", "value", "doc"}, ...], written like
   edgemoe_config_keys_json. The Python reader applies the same values (edgemoe_ort/bundle/format.py). */
EDGEMOE_EXPORT int64_t edgemoe_reader_limits_json(char* buf, int64_t len);
/* Per-thread call statistics (right while other threads share the store): begin starts counting the calling
   thread's acquires, reads and prefetches on `store_id` (0, or -1 for an unknown store id); json writes them
   like edgemoe_store_stats_json ({"hits", ..., "prefetch": {...}, "layers": [...]}; -1 if not begun); end
   stops. */
EDGEMOE_EXPORT int64_t edgemoe_thread_stats_begin(const char* store_id);
EDGEMOE_EXPORT int64_t edgemoe_thread_stats_json(const char* store_id, char* buf, int64_t len);
EDGEMOE_EXPORT void edgemoe_thread_stats_end(const char* store_id);
/* Saves the resident experts of the live session(s) of `store_id` to `path` (for edgemoe.warm_start). 0 on
   success; -1 with a NUL-terminated message in err (if err_len > 0). */
EDGEMOE_EXPORT int64_t edgemoe_save_resident(const char* store_id, const char* path, char* err, int64_t err_len);
/* "avx2", "neon" or "scalar": the kernel path gemm_rows dispatches to. */
EDGEMOE_EXPORT const char* edgemoe_kernel_path(void);

#ifdef __cplusplus
}
#endif
#endif
