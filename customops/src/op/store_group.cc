#include "store_group.h"

#include <filesystem>

namespace edgemoe {

std::shared_ptr<Engine> StoreGroup::get(const std::string& manifest_rel) {
  std::lock_guard<std::mutex> lk(mu_);
  const std::string norm = std::filesystem::path(manifest_rel).lexically_normal().string();
  if (auto s = engine_.lock()) {
    if (norm != manifest_) {
      throw Error(cfg_.bundle_dir + ": manifest (attribute): one registration serves one manifest (expected '" +
                  manifest_ + "', found '" + manifest_rel + "'); register the library again for another");
    }
    return s;
  }
  auto s = std::make_shared<Engine>(load_manifest(cfg_.bundle_dir, manifest_rel), cfg_);
  publish_engine(s->store().options().store_id, s);
  engine_ = s;
  manifest_ = norm;
  return s;
}

}  // namespace edgemoe
