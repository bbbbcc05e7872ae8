// A C++ host running an edgemoe bundle end to end with the ONNX Runtime C/C++ API only (no Python, no
// tokenizers): the bundle's tokenizer graph -> greedy decoding with the decoder graph and its KV cache -> the
// detokenizer graph. docs/op-contract.md, "A C++ host".
//
//   host_demo BUNDLE --ortx-lib LIB --edgemoe-lib LIB [--prompt TEXT] [--max-new-tokens N]
//             [--config KEY=VALUE]... [--preload LIB]... [--json]
//
// --ortx-lib: the onnxruntime-extensions op library (python -c "import onnxruntime_extensions as o;
// print(o.get_library_path())", or a libortextensions.so built from source). --edgemoe-lib: ours
// (edgemoe_ort/_lib/libedgemoe_customops.so). --config: session config entries of the decoder session, set
// before our library is registered (edgemoe.bundle_dir is set to BUNDLE unless given). --preload: a library
// loaded first with RTLD_GLOBAL (the pip wheel's extensions library is a Python extension module whose
// Python symbols must resolve: preload libpython3.X.so; the interpreter is never started).
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <onnxruntime_cxx_api.h>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct Args {
  fs::path bundle;
  std::string ortx_lib, edgemoe_lib, prompt = "def fibonacci(n):";
  int max_new_tokens = 16;
  std::vector<std::pair<std::string, std::string>> config;
  std::vector<std::string> preload;
  bool as_json = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "error: " << why << "\nusage: host_demo BUNDLE --ortx-lib LIB --edgemoe-lib LIB [--prompt TEXT]"
            << " [--max-new-tokens N] [--config KEY=VALUE]... [--preload LIB]... [--json]\n";
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + ": expected a value");
      return argv[++i];
    };
    if (k == "--ortx-lib") a.ortx_lib = value();
    else if (k == "--edgemoe-lib") a.edgemoe_lib = value();
    else if (k == "--prompt") a.prompt = value();
    else if (k == "--max-new-tokens") a.max_new_tokens = std::stoi(value());
    else if (k == "--preload") a.preload.push_back(value());
    else if (k == "--json") a.as_json = true;
    else if (k == "--config") {
      std::string kv = value();
      auto eq = kv.find('=');
      if (eq == std::string::npos) usage("--config " + kv + ": expected KEY=VALUE");
      a.config.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
    } else if (!k.empty() && k[0] == '-') usage("unknown option " + k);
    else if (a.bundle.empty()) a.bundle = k;
    else usage("unexpected argument " + k);
  }
  if (a.bundle.empty() || a.ortx_lib.empty() || a.edgemoe_lib.empty()) usage("BUNDLE, --ortx-lib, --edgemoe-lib");
  if (a.max_new_tokens < 1) usage("--max-new-tokens: expected >= 1");
  return a;
}

json read_manifest(const fs::path& bundle) {
  std::ifstream f(bundle / "manifest.json");
  if (!f) throw std::runtime_error((bundle / "manifest.json").string() + ": cannot be read");
  return json::parse(f);
}

std::string graph(const json& m, const fs::path& bundle, const std::string& role) {
  const json& g = m.at("graphs");
  if (!g.contains(role)) {
    std::string why = m.contains("tokenizer_graphs") ? m["tokenizer_graphs"].value("reason", std::string("?"))
                                                     : "exported before tokenizer graphs existed";
    throw std::runtime_error("the bundle has no '" + role + "' graph (" + why + ")");
  }
  return (bundle / g.at(role).get<std::string>()).string();
}

// Token ids of `text`: the tokenizer graph (input_text string [1] -> input_ids int64 [1, L]).
std::vector<int64_t> tokenize(Ort::Session& s, const std::string& text) {
  Ort::AllocatorWithDefaultOptions alloc;
  const int64_t shape[1] = {1};
  Ort::Value in = Ort::Value::CreateTensor(alloc, shape, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING);
  const char* strs[1] = {text.c_str()};
  in.FillStringTensor(strs, 1);
  auto in_name = s.GetInputNameAllocated(0, alloc);
  const char* in_names[] = {in_name.get()};
  const char* out_names[] = {"input_ids"};
  auto out = s.Run(Ort::RunOptions{nullptr}, in_names, &in, 1, out_names, 1);
  auto info = out[0].GetTensorTypeAndShapeInfo();
  const int64_t* p = out[0].GetTensorData<int64_t>();
  return {p, p + info.GetElementCount()};
}

// Text of `ids`: the detokenizer graph (ids int64 [L] -> str string [1]); raw UTF-8 bytes.
std::string detokenize(Ort::Session& s, std::vector<int64_t> ids) {
  if (ids.empty()) return "";  // onnxruntime-extensions 0.15 divides by the length: never feed it []
  Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const int64_t shape[1] = {static_cast<int64_t>(ids.size())};
  Ort::Value in = Ort::Value::CreateTensor<int64_t>(mem, ids.data(), ids.size(), shape, 1);
  Ort::AllocatorWithDefaultOptions alloc;
  auto in_name = s.GetInputNameAllocated(0, alloc);
  auto out_name = s.GetOutputNameAllocated(0, alloc);
  const char* in_names[] = {in_name.get()};
  const char* out_names[] = {out_name.get()};
  auto out = s.Run(Ort::RunOptions{nullptr}, in_names, &in, 1, out_names, 1);
  return out[0].GetStringTensorElement(0);
}

// The decoder graph as edgemoe_ort.runtime.generate feeds it: input_ids [1, S], attention_mask of ones
// [1, past + S] and position_ids past..past+S-1 where the graph has them, past_key_values.* [1, heads, past, dim]
// (empty at the start); outputs logits [1, S, V] and present.* (the next past).
class Decoder {
 public:
  explicit Decoder(Ort::Session& s) : s_(s) {
    Ort::AllocatorWithDefaultOptions alloc;
    for (size_t i = 0; i < s.GetInputCount(); ++i) {
      std::string name = s.GetInputNameAllocated(i, alloc).get();
      inputs_.push_back(name);
      if (name.rfind("past_key_values.", 0) == 0) {
        auto shape = s.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetShape();  // [B, heads, past, dim]
        if (shape.size() != 4 || shape[1] < 1 || shape[3] < 1)
          throw std::runtime_error(name + ": expected [batch, heads, past, head_dim] with static heads/dim");
        past_.push_back({name, shape[1], shape[3], "", {}});
      }
    }
    for (size_t i = 0; i < s.GetOutputCount(); ++i) outputs_.push_back(s.GetOutputNameAllocated(i, alloc).get());
    for (auto& p : past_) {
      std::string present = "present." + p.name.substr(std::strlen("past_key_values."));
      if (std::find(outputs_.begin(), outputs_.end(), present) == outputs_.end())
        throw std::runtime_error(p.name + ": no output " + present);
      p.present = present;
      p.data.clear();  // past length 0
    }
  }

  // One pass over `ids` after the cache; returns the logits of the last position and updates the cache.
  std::vector<float> step(const std::vector<int64_t>& ids) {
    Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const int64_t seq = static_cast<int64_t>(ids.size());
    std::vector<int64_t> ids_buf = ids, mask(static_cast<size_t>(past_len_ + seq), 1), pos(ids.size());
    for (int64_t i = 0; i < seq; ++i) pos[static_cast<size_t>(i)] = past_len_ + i;
    std::vector<Ort::Value> values;
    std::vector<const char*> names;
    for (const auto& name : inputs_) {
      if (name == "input_ids") {
        const int64_t shape[2] = {1, seq};
        values.push_back(Ort::Value::CreateTensor<int64_t>(mem, ids_buf.data(), ids_buf.size(), shape, 2));
      } else if (name == "attention_mask") {
        const int64_t shape[2] = {1, past_len_ + seq};
        values.push_back(Ort::Value::CreateTensor<int64_t>(mem, mask.data(), mask.size(), shape, 2));
      } else if (name == "position_ids") {
        const int64_t shape[2] = {1, seq};
        values.push_back(Ort::Value::CreateTensor<int64_t>(mem, pos.data(), pos.size(), shape, 2));
      } else {
        auto it = std::find_if(past_.begin(), past_.end(), [&](const Past& p) { return p.name == name; });
        if (it == past_.end()) throw std::runtime_error("decoder input " + name + ": not fed by this host");
        const int64_t shape[4] = {1, it->heads, past_len_, it->dim};
        values.push_back(Ort::Value::CreateTensor<float>(mem, it->data.data(), it->data.size(), shape, 4));
      }
      names.push_back(name.c_str());
    }
    std::vector<const char*> out_names;
    for (const auto& o : outputs_) out_names.push_back(o.c_str());
    auto out = s_.Run(Ort::RunOptions{nullptr}, names.data(), values.data(), values.size(), out_names.data(),
                      out_names.size());
    std::vector<float> last;
    for (size_t i = 0; i < outputs_.size(); ++i) {
      const float* p = out[i].GetTensorData<float>();
      const size_t n = out[i].GetTensorTypeAndShapeInfo().GetElementCount();
      if (outputs_[i] == "logits") {
        auto shape = out[i].GetTensorTypeAndShapeInfo().GetShape();  // [1, S, V]
        const size_t vocab = static_cast<size_t>(shape.back());
        last.assign(p + n - vocab, p + n);
      }
      for (auto& pk : past_)
        if (pk.present == outputs_[i]) pk.data.assign(p, p + n);
    }
    past_len_ += seq;
    if (last.empty()) throw std::runtime_error("the decoder has no logits output");
    return last;
  }

 private:
  struct Past {
    std::string name;
    int64_t heads, dim;
    std::string present;
    std::vector<float> data;
  };
  Ort::Session& s_;
  std::vector<std::string> inputs_, outputs_;
  std::vector<Past> past_;
  int64_t past_len_ = 0;
};

std::vector<int64_t> eos_ids(const json& config) {
  std::vector<int64_t> out;
  if (config.contains("eos_token_id")) {
    const json& e = config["eos_token_id"];
    if (e.is_number_integer()) out.push_back(e.get<int64_t>());
    if (e.is_array())
      for (const auto& x : e) out.push_back(x.get<int64_t>());
  }
  return out;
}

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? " " : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  for (const auto& lib : a.preload) {
    if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      std::cerr << "error: --preload " << lib << ": " << dlerror() << "\n";
      return 2;
    }
  }
  try {
    const fs::path bundle = fs::absolute(a.bundle);
    const json manifest = read_manifest(bundle);
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "host_demo");

    // Tokenizer graphs: the extensions' op library only, one thread (the kernels are sequential).
    Ort::SessionOptions tok_opts;
    tok_opts.SetIntraOpNumThreads(1);
    tok_opts.RegisterCustomOpsLibrary(a.ortx_lib.c_str());
    Ort::Session tok(env, graph(manifest, bundle, "tokenizer").c_str(), tok_opts);
    Ort::Session detok(env, graph(manifest, bundle, "detokenizer").c_str(), tok_opts);

    // Decoder: our config entries first, then our library (it reads them when it is registered).
    Ort::SessionOptions dec_opts;
    bool have_dir = false;
    for (const auto& [k, v] : a.config) {
      dec_opts.AddConfigEntry(k.c_str(), v.c_str());
      have_dir = have_dir || k == "edgemoe.bundle_dir";
    }
    if (!have_dir) dec_opts.AddConfigEntry("edgemoe.bundle_dir", bundle.string().c_str());
    dec_opts.RegisterCustomOpsLibrary(a.edgemoe_lib.c_str());
    Ort::Session dec(env, graph(manifest, bundle, "decoder").c_str(), dec_opts);

    const json& config = manifest.at("model").at("config");
    const std::vector<int64_t> eos = eos_ids(config);
    int64_t context = config.value("max_position_embeddings", int64_t{0});

    std::vector<int64_t> prompt = tokenize(tok, a.prompt);
    if (prompt.empty()) throw std::runtime_error("the prompt is empty (no tokens)");
    Decoder decoder(dec);
    std::vector<int64_t> generated;
    std::vector<float> logits = decoder.step(prompt);
    std::string stop = "max_new_tokens";
    while (true) {
      const int64_t next = std::max_element(logits.begin(), logits.end()) - logits.begin();  // first max
      if (std::find(eos.begin(), eos.end(), next) != eos.end()) {
        stop = "eos";
        break;
      }
      generated.push_back(next);
      if (static_cast<int>(generated.size()) >= a.max_new_tokens) break;
      if (context > 0 && static_cast<int64_t>(prompt.size() + generated.size()) >= context) {
        stop = "context";
        break;
      }
      logits = decoder.step({next});
    }
    const std::string text = detokenize(detok, generated);
    if (a.as_json) {
      json out = {{"prompt_ids", prompt}, {"tokens", generated}, {"stop_reason", stop}, {"text", text}};
      // invalid UTF-8 (text cut inside a character) is written as U+FFFD
      std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    } else {
      std::cout << "prompt: " << a.prompt << "\nprompt ids: " << join(prompt) << "\ntokens: " << join(generated)
                << " (" << stop << ")\ntext: " << a.prompt << text << "\n";
    }
  } catch (const Ort::Exception& e) {
    std::cerr << "error: onnxruntime: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
