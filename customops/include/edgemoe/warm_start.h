// Warm start: fill the budget at session start, in the background, with the experts most likely needed
// (edgemoe.warm_start: `profile` = the routing profile's most used experts; or a resident set saved by
// edgemoe_save_resident from an earlier session of the same bundle). Warm reads are prefetches of the lowest
// priority: every demand read and every prediction goes before them, and they stop short of the budget by
// the room one layer's misses need.
#pragma once
#include <string>
#include <vector>

#include "edgemoe/profile.h"
#include "edgemoe/store.h"

namespace edgemoe {

// Experts to warm, most wanted first: by profile frequency, or from a saved file (checked against the bundle
// identity; a file of another bundle is refused with a clear message). Throws edgemoe::Error.
std::vector<ExpertKey> warm_set(const std::string& spec, const Manifest& m, const RoutingProfile* profile);
// Queues warm reads of `keys` while they fit. Returns how many were queued.
size_t warm_start(ExpertStore& store, const std::vector<ExpertKey>& keys);
// Writes the store's resident experts (most recently used first) to `path` keyed by the bundle identity
// (tmp file + rename). Throws edgemoe::Error.
void save_resident_set(const ExpertStore& store, const std::string& path);

}  // namespace edgemoe
