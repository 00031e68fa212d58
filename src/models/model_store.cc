#include "models/model_store.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "gguf.h"

namespace kvb::models {

namespace fs = std::filesystem;

namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string Home() {
  std::string h = Env("HOME");
  return h.empty() ? "." : h;
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool IsFile(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

bool IsDir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

std::vector<fs::path> SortedEntries(const fs::path& dir, bool dirs) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::error_code e2;
    if (dirs ? e.is_directory(e2) : e.is_regular_file(e2)) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A name part must be a plain name: no traversal, no separators.
bool PlainName(std::string_view s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string_view::npos &&
         s.find('\\') == std::string_view::npos && s.find('\0') == std::string_view::npos;
}

std::vector<std::string> Split(std::string_view s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      out.emplace_back(s.substr(start, i - start));
      start = i + 1;
    }
  return out;
}

// ---- Ollama -------------------------------------------------------------------

struct OllamaName {
  std::string host;  // empty: any host directory under manifests/
  std::string ns = "library";
  std::string model;
  std::string tag = "latest";
};

StatusOr<OllamaName> ParseOllama(std::string_view spec) {
  OllamaName n;
  const size_t slash = spec.rfind('/');
  const size_t colon = spec.rfind(':');
  std::string_view path = spec;
  if (colon != std::string_view::npos && (slash == std::string_view::npos || colon > slash)) {
    n.tag = std::string(spec.substr(colon + 1));
    path = spec.substr(0, colon);
  }
  auto parts = Split(path, '/');
  if (parts.size() == 1) {
    n.model = parts[0];
  } else if (parts.size() == 2) {
    n.ns = parts[0];
    n.model = parts[1];
  } else if (parts.size() == 3) {
    n.host = parts[0];
    n.ns = parts[1];
    n.model = parts[2];
  } else {
    return Status::InvalidArgument("not an Ollama model name: '" + std::string(spec) + "'");
  }
  for (const std::string& p : {n.ns, n.model, n.tag})
    if (!PlainName(p)) return Status::InvalidArgument("not an Ollama model name: '" + std::string(spec) + "'");
  if (!n.host.empty() && !PlainName(n.host))
    return Status::InvalidArgument("not an Ollama model name: '" + std::string(spec) + "'");
  return n;
}

// The model layer's blob of a manifest file; empty when it has none.
std::string OllamaBlob(const fs::path& models, const fs::path& manifest) {
  std::ifstream in(manifest);
  const auto j = nlohmann::json::parse(in, nullptr, false);
  if (!j.is_object() || !j.contains("layers") || !j["layers"].is_array()) return "";
  for (const auto& layer : j["layers"]) {
    if (!layer.is_object() || layer.value("mediaType", "") != "application/vnd.ollama.image.model") continue;
    std::string digest = layer.value("digest", "");
    const size_t colon = digest.find(':');
    if (colon == std::string::npos || !PlainName(digest)) return "";
    digest[colon] = '-';  // blobs are named sha256-<hex>
    return (models / "blobs" / digest).string();
  }
  return "";
}

StatusOr<ModelRef> ResolveOllama(std::string_view spec, std::string_view name, const StoreDirs& dirs) {
  auto n = ParseOllama(name);
  if (!n.ok()) return n.status();
  const fs::path models = dirs.ollama;
  std::vector<fs::path> hosts;
  if (!n->host.empty()) hosts.push_back(models / "manifests" / n->host);
  else hosts = SortedEntries(models / "manifests", true);
  for (const fs::path& host : hosts) {
    const fs::path manifest = host / n->ns / n->model / n->tag;
    if (!IsFile(manifest)) continue;
    const std::string blob = OllamaBlob(models, manifest);
    if (blob.empty())
      return Status::InvalidArgument("Ollama's manifest " + manifest.string() + " has no model layer");
    if (!IsFile(blob))
      return Status::NotFound("Ollama's manifest for '" + std::string(name) + "' names " + blob +
                              ", which is missing (an interrupted `ollama pull`?)");
    return ModelRef{std::string(spec), blob, "ollama"};
  }
  return Status::NotFound("no Ollama model '" + std::string(name) + "' in " + models.string() +
                          " (looked for manifests/*/" + n->ns + "/" + n->model + "/" + n->tag +
                          "; set OLLAMA_MODELS if Ollama keeps its models elsewhere)");
}

// ---- GGUF files in a folder (Hugging Face snapshots, LM Studio) --------------------

bool IsGguf(const fs::path& p) { return Lower(p.extension().string()) == ".gguf"; }
bool IsProjector(const fs::path& p) { return Lower(p.filename().string()).rfind("mmproj", 0) == 0; }
// The parts after the first of a split GGUF (-00002-of-00003.gguf): llama.cpp loads them from the first.
bool IsLaterSplit(const fs::path& p) {
  const std::string s = p.filename().string();
  const size_t of = s.rfind("-of-");
  return of != std::string::npos && of >= 6 && s.compare(of - 6, 6, "-00001") != 0;
}

std::vector<fs::path> GgufsUnder(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, fs::directory_options::follow_directory_symlink, ec), end;
       !ec && it != end; it.increment(ec)) {
    if (it.depth() > 4) it.disable_recursion_pending();
    const fs::path p = it->path();
    if (IsGguf(p) && IsFile(p) && !IsProjector(p) && !IsLaterSplit(p)) out.push_back(p);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Picks one GGUF of a repository: the file named by `select` (a relative
// path or a file name), or the one whose name holds `select` as a
// quantisation (Q4_K_M), or the only one; with several and no selector,
// Q4_K_M (as llama.cpp's -hf does).
StatusOr<fs::path> PickGguf(const fs::path& dir, const std::vector<fs::path>& files, const std::string& select,
                            const std::string& what) {
  if (files.empty()) return Status::NotFound(what + " has no .gguf file (in " + dir.string() + ")");
  auto names = [&] {
    std::string s;
    for (const auto& f : files) s += (s.empty() ? "" : ", ") + fs::relative(f, dir).string();
    return s;
  };
  std::vector<fs::path> hits;
  if (!select.empty()) {
    const std::string want = Lower(select);
    for (const auto& f : files)
      if (Lower(fs::relative(f, dir).string()) == want || Lower(f.filename().string()) == want) return f;
    // A quantisation is a whole part of the name: Q4_K must not pick Q4_K_M.
    auto bounded = [](const std::string& stem, size_t at, size_t n) {
      const bool before = at == 0 || std::string_view("-._").find(stem[at - 1]) != std::string_view::npos;
      const bool after = at + n == stem.size() || std::string_view("-.").find(stem[at + n]) != std::string_view::npos;
      return before && after;
    };
    for (const auto& f : files) {
      const std::string stem = Lower(f.stem().string());
      for (size_t at = stem.find(want); at != std::string::npos; at = stem.find(want, at + 1))
        if (bounded(stem, at, want.size())) {
          hits.push_back(f);
          break;
        }
    }
    if (hits.size() == 1) return hits[0];
    if (hits.empty()) return Status::NotFound(what + " has no file matching '" + select + "' (it has " + names() + ")");
    return Status::InvalidArgument(what + ": several files match '" + select + "': name one of " + names());
  }
  if (files.size() == 1) return files[0];
  for (const auto& f : files)
    if (Lower(f.filename().string()).find("q4_k_m") != std::string::npos) return f;
  return Status::InvalidArgument(what + " has several GGUF files: add :FILE or :QUANT, one of " + names());
}

// ORG/REPO[:FILE|QUANT] or PUB/MODEL[:...]: the two names and the selector.
StatusOr<std::pair<std::vector<std::string>, std::string>> RepoAndSelector(std::string_view name,
                                                                          const char* kind) {
  std::string_view repo = name;
  std::string select;
  if (const size_t colon = name.find(':'); colon != std::string_view::npos) {
    repo = name.substr(0, colon);
    select = std::string(name.substr(colon + 1));
  }
  auto parts = Split(repo, '/');
  if (parts.size() != 2 || !PlainName(parts[0]) || !PlainName(parts[1]) ||
      select.find("..") != std::string::npos)
    return Status::InvalidArgument(std::string("expected ") + kind + " (got '" + std::string(name) + "')");
  return std::make_pair(parts, select);
}

fs::path HfSnapshot(const fs::path& repo_dir) {
  std::ifstream ref(repo_dir / "refs" / "main");
  std::string rev;
  if (ref && std::getline(ref, rev) && PlainName(rev) && IsDir(repo_dir / "snapshots" / rev))
    return repo_dir / "snapshots" / rev;
  auto snaps = SortedEntries(repo_dir / "snapshots", true);
  return snaps.size() == 1 ? snaps[0] : fs::path();
}

StatusOr<ModelRef> ResolveHf(std::string_view spec, std::string_view name, const StoreDirs& dirs) {
  auto rs = RepoAndSelector(name, "hf:ORG/REPO[:FILE|QUANT]");
  if (!rs.ok()) return rs.status();
  const auto& [parts, select] = *rs;
  const std::string what = "the Hugging Face repository " + parts[0] + "/" + parts[1];
  std::string looked;
  for (const std::string& cache : dirs.hf) {
    const fs::path repo_dir = fs::path(cache) / ("models--" + parts[0] + "--" + parts[1]);
    looked += (looked.empty() ? "" : ", ") + cache;
    if (IsDir(repo_dir)) {
      const fs::path snap = HfSnapshot(repo_dir);
      if (snap.empty()) return Status::NotFound(what + " has no snapshot in " + repo_dir.string());
      auto file = PickGguf(snap, GgufsUnder(snap), select, what);
      if (!file.ok()) return file.status();
      return ModelRef{std::string(spec), file->string(), "hf"};
    }
    // llama.cpp's own cache without the hub layout: ORG_REPO_FILE.gguf.
    std::vector<fs::path> flat;
    for (const auto& f : SortedEntries(cache, false))
      if (IsGguf(f) && !IsLaterSplit(f) && f.filename().string().rfind(parts[0] + "_" + parts[1] + "_", 0) == 0)
        flat.push_back(f);
    if (!flat.empty()) {
      auto file = PickGguf(cache, flat, select, what);
      if (!file.ok()) return file.status();
      return ModelRef{std::string(spec), file->string(), "hf"};
    }
  }
  return Status::NotFound(what + " is not in a local cache (looked in " + (looked.empty() ? "none" : looked) +
                          "; set HF_HUB_CACHE, HF_HOME or LLAMA_CACHE, or download it first: kvbatch never uses "
                          "the network)");
}

StatusOr<ModelRef> ResolveLmStudio(std::string_view spec, std::string_view name, const StoreDirs& dirs) {
  auto rs = RepoAndSelector(name, "lmstudio:PUBLISHER/MODEL[:FILE|QUANT]");
  if (!rs.ok()) return rs.status();
  const auto& [parts, select] = *rs;
  const std::string what = "the LM Studio model " + parts[0] + "/" + parts[1];
  for (const std::string& root : dirs.lmstudio) {
    const fs::path dir = fs::path(root) / parts[0] / parts[1];
    if (!IsDir(dir)) continue;
    auto file = PickGguf(dir, GgufsUnder(dir), select, what);
    if (!file.ok()) return file.status();
    return ModelRef{std::string(spec), file->string(), "lmstudio"};
  }
  std::string roots;
  for (const auto& r : dirs.lmstudio) roots += (roots.empty() ? "" : ", ") + r;
  return Status::NotFound(what + " is not in " + roots + " (set LMSTUDIO_MODELS if LM Studio keeps models elsewhere)");
}

}  // namespace

StoreDirs StoreDirs::FromEnvironment() {
  StoreDirs d;
  const std::string home = Home();
  d.ollama = Env("OLLAMA_MODELS");
  if (d.ollama.empty()) d.ollama = home + "/.ollama/models";
  if (std::string v = Env("HF_HUB_CACHE"); !v.empty()) d.hf.push_back(v);
  else if (std::string h = Env("HF_HOME"); !h.empty()) d.hf.push_back(h + "/hub");
  else d.hf.push_back(home + "/.cache/huggingface/hub");
  if (std::string l = Env("LLAMA_CACHE"); !l.empty()) d.hf.push_back(l);
  else d.hf.push_back(home + "/.cache/llama.cpp");
  if (std::string v = Env("LMSTUDIO_MODELS"); !v.empty()) d.lmstudio.push_back(v);
  d.lmstudio.push_back(home + "/.lmstudio/models");
  d.lmstudio.push_back(home + "/.cache/lm-studio/models");
  return d;
}

StatusOr<ModelRef> Resolve(std::string_view spec, const StoreDirs& dirs) {
  auto starts = [&](std::string_view p) { return spec.substr(0, p.size()) == p; };
  if (starts("ollama:")) return ResolveOllama(spec, spec.substr(7), dirs);
  if (starts("hf:")) return ResolveHf(spec, spec.substr(3), dirs);
  if (starts("lmstudio:")) return ResolveLmStudio(spec, spec.substr(9), dirs);
  if (IsFile(fs::path(spec))) return ModelRef{fs::path(spec).stem().string(), std::string(spec), "path"};
  // gemma3:12b with no such file: an Ollama name.
  if (spec.find(':') != std::string_view::npos && !IsGguf(fs::path(spec))) {
    auto r = ResolveOllama(spec, spec, dirs);
    if (r.ok() || r.status().code() != StatusCode::kInvalidArgument) return r;
  }
  return Status::NotFound("model not found: " + std::string(spec) +
                          " (a GGUF path, or ollama:NAME[:TAG], hf:ORG/REPO[:FILE|QUANT], "
                          "lmstudio:PUBLISHER/MODEL[:FILE|QUANT]; `kvbatch models` lists what is on this machine)");
}

std::vector<ModelRef> ListAll(const StoreDirs& dirs) {
  std::vector<ModelRef> out;
  const fs::path models = dirs.ollama;
  for (const fs::path& host : SortedEntries(models / "manifests", true))
    for (const fs::path& ns : SortedEntries(host, true))
      for (const fs::path& model : SortedEntries(ns, true))
        for (const fs::path& tag : SortedEntries(model, false)) {
          const std::string blob = OllamaBlob(models, tag);
          if (blob.empty() || !IsFile(blob)) continue;
          const std::string nsname = ns.filename().string();
          out.push_back({"ollama:" + (nsname == "library" ? "" : nsname + "/") + model.filename().string() + ":" +
                             tag.filename().string(),
                         blob, "ollama"});
        }
  for (const std::string& cache : dirs.hf)
    for (const fs::path& repo : SortedEntries(cache, true)) {
      const std::string dir = repo.filename().string();
      if (dir.rfind("models--", 0) != 0) continue;
      const size_t sep = dir.find("--", 8);
      if (sep == std::string::npos) continue;
      const std::string name = dir.substr(8, sep - 8) + "/" + dir.substr(sep + 2);
      const fs::path snap = HfSnapshot(repo);
      if (snap.empty()) continue;
      const auto files = GgufsUnder(snap);
      for (const fs::path& f : files)
        out.push_back({"hf:" + name + (files.size() > 1 ? ":" + fs::relative(f, snap).string() : ""), f.string(), "hf"});
    }
  for (const std::string& root : dirs.lmstudio)
    for (const fs::path& pub : SortedEntries(root, true))
      for (const fs::path& model : SortedEntries(pub, true)) {
        const auto files = GgufsUnder(model);
        const std::string name = pub.filename().string() + "/" + model.filename().string();
        for (const fs::path& f : files)
          out.push_back({"lmstudio:" + name + (files.size() > 1 ? ":" + fs::relative(f, model).string() : ""),
                         f.string(), "lmstudio"});
      }
  return out;
}

StatusOr<GgufInfo> ReadGgufInfo(const std::string& path) {
  gguf_init_params params = {/*no_alloc=*/true, /*ctx=*/nullptr};
  gguf_context* ctx = gguf_init_from_file(path.c_str(), params);
  if (ctx == nullptr) return Status::InvalidArgument(path + " is not a readable GGUF file");
  GgufInfo info;
  std::error_code ec;
  info.bytes = static_cast<int64_t>(fs::file_size(path, ec));
  auto str = [&](const std::string& key) -> std::string {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    return id >= 0 && gguf_get_kv_type(ctx, id) == GGUF_TYPE_STRING ? gguf_get_val_str(ctx, id) : "";
  };
  auto integer = [&](const std::string& key) -> int64_t {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) return -1;
    switch (gguf_get_kv_type(ctx, id)) {
      case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx, id);
      case GGUF_TYPE_INT32: return gguf_get_val_i32(ctx, id);
      case GGUF_TYPE_UINT64: return static_cast<int64_t>(gguf_get_val_u64(ctx, id));
      case GGUF_TYPE_INT64: return gguf_get_val_i64(ctx, id);
      default: return -1;
    }
  };
  info.architecture = str("general.architecture");
  info.context_length = std::max<int64_t>(0, integer(info.architecture + ".context_length"));
  info.tensors = gguf_get_n_tensors(ctx);
  // The quantisation: the type most of the weight bytes have (2-D tensors).
  std::map<std::string, int64_t> by_type;
  for (int64_t i = 0; i < info.tensors; ++i) {
    const std::string name = gguf_get_tensor_name(ctx, i);
    if (name.rfind("v.", 0) == 0 || name.rfind("mm.", 0) == 0 || name.rfind("vision", 0) == 0) info.vision = true;
    by_type[ggml_type_name(gguf_get_tensor_type(ctx, i))] += static_cast<int64_t>(gguf_get_tensor_size(ctx, i));
  }
  by_type.erase("f32");  // norms and biases
  info.quantization = "?";
  int64_t most = 0;
  for (const auto& [type, bytes] : by_type)
    if (bytes > most) {
      most = bytes;
      info.quantization = type;
    }
  for (char& c : info.quantization) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (gguf_find_key(ctx, "clip.has_vision_encoder") >= 0) info.vision = true;
  gguf_free(ctx);
  return info;
}

std::string ExplainLoadFailure(const ModelRef& ref, const std::string& failure) {
  if (ref.source != "ollama") return failure;
  std::string why;
  if (auto info = ReadGgufInfo(ref.path); info.ok() && info->vision)
    why = " It embeds vision tensors, which this llama.cpp does not load from the model file.";
  return failure + " -- '" + ref.name + "' is Ollama's blob " + ref.path + "." + why +
         " Some of Ollama's own builds (its gemma3 library models, for one) lack keys llama.cpp requires. Remedy: "
         "use a GGUF made by llama.cpp's convert_hf_to_gguf.py or published as GGUF (e.g. in a Hugging Face "
         "cache: -m hf:ORG/REPO:QUANT, or a path), or import that GGUF into Ollama and use it from there.";
}

}  // namespace kvb::models
