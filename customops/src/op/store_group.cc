#include "store_group.h"

#include <filesystem>

namespace edgemoe {

std::shared_ptr<ExpertStore> StoreGroup::get(const std::string& manifest_rel) {
  std::lock_guard<std::mutex> lk(mu_);
  const std::string norm = std::filesystem::path(manifest_rel).lexically_normal().string();
  if (auto s = store_.lock()) {
    if (norm != manifest_) {
      throw Error(cfg_.bundle_dir + ": manifest (attribute): one registration serves one manifest (expected '" +
                  manifest_ + "', found '" + manifest_rel + "'); register the library again for another");
    }
    return s;
  }
  Manifest m = load_manifest(cfg_.bundle_dir, manifest_rel);
  StoreOptions o = cfg_.store;
  o.budget_bytes = parse_budget(cfg_.budget, m.store_size);
  auto s = std::make_shared<ExpertStore>(std::move(m), o);
  store_ = s;
  manifest_ = norm;
  return s;
}

}  // namespace edgemoe
