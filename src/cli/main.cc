// kvbatch: OpenAI-style batch inference on your own hardware.
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>

#include "batch/limits.h"
#include "cli/estimate_command.h"
#include "cli/models_command.h"
#include "cli/run_command.h"
#include "cli/serve_command.h"
#include "store/open_store.h"
#include "tools/gen_model.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kModelHelp =
    "A GGUF path, or a model by name: ollama:NAME[:TAG], hf:ORG/REPO[:FILE|QUANT], "
    "lmstudio:PUBLISHER/MODEL[:FILE|QUANT] (see `kvbatch models`; default: the generated demo model)";

fs::path DataHome() {
  if (const char* d = std::getenv("KVBATCH_HOME")) return d;
  if (const char* x = std::getenv("XDG_DATA_HOME")) return fs::path(x) / "kvbatch";
  const char* home = std::getenv("HOME");
  return fs::path(home ? home : ".") / ".local" / "share" / "kvbatch";
}

fs::path VocabDir() {
  if (const char* v = std::getenv("KVBATCH_VOCAB_DIR")) return v;
  return KVBATCH_VOCAB_DIR;
}

// The demo model: generated on first use, so `kvbatch run` works on a fresh
// machine with no download.
fs::path DemoModelPath() { return DataHome() / "models" / "kvbatch-demo.gguf"; }

int GenModel(const std::string& preset, const std::string& out, const std::string& vocab, uint64_t seed,
             const std::string& type, const std::string& chat_template, bool quiet) {
  auto opts = kvb::tools::ModelPreset(preset);
  if (!opts.ok()) {
    std::fprintf(stderr, "kvbatch: %s\n", opts.status().message().c_str());
    return 2;
  }
  opts->out_path = out;
  opts->vocab_path = vocab.empty() ? (VocabDir() / opts->vocab_file).string() : vocab;
  opts->seed = seed;
  if (!chat_template.empty()) {
    std::ifstream in(chat_template, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in || text.str().empty()) {
      std::fprintf(stderr, "kvbatch: cannot read the chat template %s\n", chat_template.c_str());
      return 2;
    }
    opts->chat_template = text.str();
  }
  if (type == "f16") opts->weight_type = GGML_TYPE_F16;
  else if (type == "f32") opts->weight_type = GGML_TYPE_F32;
  else if (type == "q8_0") opts->weight_type = GGML_TYPE_Q8_0;
  else if (type == "q4_k") opts->weight_type = GGML_TYPE_Q4_K;
  else if (!type.empty()) {
    std::fprintf(stderr, "kvbatch: unknown weight type %s (q8_0, q4_k, f16, f32)\n", type.c_str());
    return 2;
  }
  std::error_code ec;
  if (fs::path(out).has_parent_path()) fs::create_directories(fs::path(out).parent_path(), ec);
  kvb::Status st = kvb::tools::GenerateModel(*opts);
  if (!st.ok()) {
    std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
    return 1;
  }
  if (!quiet)
    std::fprintf(stderr, "kvbatch: wrote %s (%s preset, %.1f MB)\n", out.c_str(), preset.c_str(),
                 static_cast<double>(fs::file_size(out, ec)) / 1e6);
  return 0;
}

// Engine flags shared by run and serve.
void AddEngineFlags(CLI::App* cmd, kvb::engine::EngineOptions& e, int32_t& n_gpu_layers) {
  cmd->add_option("--max-seqs", e.context.max_seqs, "Parallel sequences (default: 32 on CPU, 128 on GPU)");
  cmd->add_option("--kv-cells", e.context.kv_cells, "KV cache cells (default: sized from free memory)");
  cmd->add_option("--batch-tokens", e.context.n_batch, "Tokens per engine step (decode + prefill chunks)")
      ->capture_default_str();
  cmd->add_option("--ubatch-tokens", e.context.n_ubatch,
                  "Tokens per llama.cpp micro-batch (default: --batch-tokens on CPU, 512 on GPU)");
  cmd->add_option("--threads", e.context.n_threads, "CPU threads (default: all cores)");
  cmd->add_option("--gpu-layers", n_gpu_layers, "Layers on the GPU (-1: all)")->capture_default_str();
  cmd->add_option("--anchors", e.context.anchors, "Sequences reserved for shared prefixes")->capture_default_str();
  cmd->add_option("--kv-type", e.context.kv_type, "KV cache type: f16, f32 or q8_0")->capture_default_str();
  cmd->add_option("--flash-attn", e.context.flash_attn, "Flash attention (true/false)")->capture_default_str();
  cmd->add_option("--device-sampling", e.context.device_sampling,
                  "Greedy picks on the device, so that greedy steps copy no logits back: auto (on a GPU), on, off")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "on", "off"}));
  cmd->add_flag("--deterministic", e.context.deterministic,
                "Batch-invariant answers: bitwise the same alone, in any batch or order, after a resume "
                "(CPU only; slower, see docs/DETERMINISM.md)");
  cmd->add_option("--pooling", e.context.pooling,
                  "Embeddings' pooling: mean, last or cls (default: the model's; last for a decoder without one)")
      ->check(CLI::IsMember({"mean", "last", "cls"}));
}

// Batch driver flags shared by serve and worker (worker/driver_options.h).
void AddNodeFlags(CLI::App* cmd, kvb::cli::ServeOptions& o) {
  cmd->add_option("--window", o.driver.window, "Batch requests in the engine at once (0: 2 x sequences + 64)")
      ->capture_default_str();
  cmd->add_option("--chunk-rows", o.driver.chunk_rows, "Requests per chunk, the unit a worker claims")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  cmd->add_option_function<double>(
         "--lease-seconds", [&o](double s) { o.driver.lease_ms = static_cast<int64_t>(s * 1000); },
         "A claimed chunk's lease: a worker silent this long is presumed dead and its chunk taken over (default 30)")
      ->check(CLI::Range(0.1, 3600.0));
  cmd->add_option("--devices", o.devices,
                  "One engine per device, fed by one driver (data parallel): cpu or GPU indexes, e.g. 0,1,2,3 "
                  "(default: one engine where llama.cpp puts the model)")
      ->delimiter(',');
  cmd->add_option("--max-reclaims", o.driver.max_reclaims,
                  "A chunk taken over this many times fails its unanswered requests instead of looping")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
}

// -m, once or more (several models: each request's `model` picks one).
void AddModelFlags(CLI::App* cmd, std::vector<std::string>& models, int32_t& max_models) {
  cmd->add_option("-m,--model", models,
                  std::string(kModelHelp) + ". Give -m several times to serve several models: each request's "
                                            "\"model\" picks one (loaded on first use)")
      ->expected(1)
      ->allow_extra_args(false)  // `-m A input.jsonl`: the input is not a second model
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--max-models", max_models,
                  "With several -m: models loaded at once at most; the least recently used idle one is unloaded "
                  "(default 0: as many as the device's memory holds)")
      ->check(CLI::Range(0, 64));
}

// Request limits shared by run and serve (batch/limits.h).
void AddLimitFlags(CLI::App* cmd, kvb::batch::Limits& l) {
  cmd->add_option("--max-json-depth", l.max_json_depth, "Deepest JSON nesting accepted in a line or body")
      ->capture_default_str()
      ->check(CLI::Range(2, 10000));
  cmd->add_option("--max-prompt-bytes", l.max_prompt_bytes, "Largest prompt text (all messages) of one request")
      ->capture_default_str();
  cmd->add_option("--max-messages", l.max_messages, "Most messages in one chat request")->capture_default_str();
  cmd->add_option("--max-schema-bytes", l.max_schema_bytes, "Largest response_format JSON schema")
      ->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvbatch: OpenAI-style batch inference with shared-prefix KV reuse, on llama.cpp"};
  app.require_subcommand(1);

  kvb::batch::Limits limits;
  kvb::cli::RunOptions run;
  auto* run_cmd = app.add_subcommand("run", "Run an OpenAI Batch API input file (JSONL) offline");
  run_cmd->add_option("input", run.input, "Input JSONL: one {custom_id, method, url, body} per line")
      ->required()
      ->check(CLI::ExistingFile);
  run_cmd->add_option("-o,--output", run.output, "Output JSONL (appended as results finish; resumable)")->required();
  run_cmd->add_option("-e,--errors", run.errors, "Error JSONL for failed requests (default: the output file)");
  std::vector<std::string> run_models, serve_models, work_models;
  AddModelFlags(run_cmd, run_models, run.max_models);
  run_cmd->add_flag("--skip-invalid", run.skip_invalid, "Run the valid lines; write invalid ones to the error file");
  run_cmd->add_option("--default-max-tokens", run.default_max_tokens,
                      "max_tokens for requests without one (0: until the context is full)")
      ->capture_default_str();
  AddEngineFlags(run_cmd, run.engine, run.n_gpu_layers);
  AddLimitFlags(run_cmd, limits);
  run_cmd->add_flag("-q,--quiet", run.quiet, "No progress or summary");
  run_cmd->add_option("--progress-interval", run.progress_interval, "Seconds between progress lines when not on a terminal")
      ->capture_default_str();
  run_cmd->add_option("--metrics-port", run.metrics_port, "Serve Prometheus metrics at http://HOST:PORT/metrics while running (0: any free port)");
  run_cmd->add_option("--metrics-host", run.metrics_host, "Address of the metrics server")->capture_default_str();

  kvb::cli::ServeOptions serve;
  auto* serve_cmd = app.add_subcommand("serve", "Serve the OpenAI Files + Batches API and online completions over HTTP");
  AddModelFlags(serve_cmd, serve_models, serve.max_models);
  serve_cmd->add_option("--host", serve.server.host, "Address to listen on")->capture_default_str();
  serve_cmd->add_option("--port", serve.server.port, "Port (0: any free port, printed on start)")->capture_default_str();
  serve_cmd->add_option("--data-dir", serve.data_dir, "Store and files (default: <data home>/serve)");
  serve_cmd->add_option("--api-key", serve.server.api_key, "Require 'Authorization: Bearer KEY' (default: $KVBATCH_API_KEY, else none)");
  serve_cmd->add_option("--max-file-bytes", serve.server.max_file_bytes, "Largest upload accepted")->capture_default_str();
  serve_cmd->add_option("--default-max-tokens", serve.server.default_max_tokens,
                        "max_tokens for requests without one (0: until the context is full)")
      ->capture_default_str();
  AddNodeFlags(serve_cmd, serve);
  serve_cmd->add_option("--store", serve.store,
                        "postgresql://... to share batches with other nodes (then -m is optional: without it this "
                        "node only serves the API); default: SQLite in the data directory");
  AddEngineFlags(serve_cmd, serve.engine, serve.n_gpu_layers);
  AddLimitFlags(serve_cmd, limits);
  serve_cmd->add_option("--max-body-bytes", limits.max_body_bytes, "Largest JSON request body (uploads: --max-file-bytes)")
      ->capture_default_str();
  serve_cmd->add_option("--max-online-requests", serve.server.max_online_requests,
                        "Online completions at once; more get 429")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--read-timeout", serve.server.read_timeout_s,
                        "Seconds a connection may stay silent before it is closed")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600));

  kvb::cli::ServeOptions work;
  auto* worker_cmd = app.add_subcommand("worker", "Run batches from a PostgreSQL store shared with `kvbatch serve` nodes");
  worker_cmd->add_option("--store", work.store, "postgresql://... (the API nodes' store)")->required();
  AddModelFlags(worker_cmd, work_models, work.max_models);
  worker_cmd->add_option("--data-dir", work.data_dir, "Local cache of input files (default: <data home>/worker)");
  worker_cmd->add_option("--default-max-tokens", work.server.default_max_tokens,
                         "max_tokens for requests without one (0: until the context is full)")
      ->capture_default_str();
  AddNodeFlags(worker_cmd, work);
  worker_cmd->add_option("--metrics-port", work.metrics_port, "Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port)");
  worker_cmd->add_option("--metrics-host", work.metrics_host, "Address of the metrics server")->capture_default_str();
  AddEngineFlags(worker_cmd, work.engine, work.n_gpu_layers);
  AddLimitFlags(worker_cmd, limits);

  kvb::cli::EstimateOptions est;
  auto* est_cmd = app.add_subcommand("estimate", "Project a batch's tokens, KV memory, time and cost before running it");
  est_cmd->add_option("input", est.input, "Input JSONL, as for run")->required()->check(CLI::ExistingFile);
  est_cmd->add_option("-m,--model", est.model, kModelHelp);
  est_cmd->add_flag("--json", est.json, "Print one JSON object (projected_seconds, ...)");
  est_cmd->add_option("--watts", est.watts, "Power draw while running, for the energy in kWh")->check(CLI::PositiveNumber);
  est_cmd->add_option("--cost-per-hour", est.cost_per_hour, "Price of an hour of this machine, for the cost")
      ->check(CLI::PositiveNumber);
  est_cmd->add_option("--sample", est.sample, "Calibration requests (default: 2 x the parallel sequences)")
      ->check(CLI::Range(1, 100000));
  est_cmd->add_option("--default-max-tokens", est.default_max_tokens,
                      "max_tokens for requests without one, as given to run (0: until the context is full)")
      ->capture_default_str();
  AddEngineFlags(est_cmd, est.engine, est.n_gpu_layers);
  AddLimitFlags(est_cmd, limits);

  std::string preset = "tiny", out, vocab, type, chat_template;
  uint64_t seed = 42;
  auto* gen_cmd = app.add_subcommand("gen-model", "Write a llama-architecture GGUF with random weights and a real tokenizer");
  gen_cmd->add_option("--preset", preset, "tiny (~5 MB, tests), bench (~60 MB), llama3-8b (Llama 3 8B's shape, Q4_K, 4.6 GB: the GPU benchmark), bert (a small embedding model) or bert-small (bge-small's shape)")->capture_default_str();
  gen_cmd->add_option("-o,--output", out, "Output .gguf")->required();
  gen_cmd->add_option("--vocab", vocab, "Tokenizer vocabulary GGUF (default: the preset's, from llama.cpp's models/)");
  gen_cmd->add_option("--seed", seed, "Weight seed")->capture_default_str();
  gen_cmd->add_option("--type", type, "Matrix type: q8_0, q4_k, f16 or f32 (default: the preset's)");
  gen_cmd->add_option("--chat-template", chat_template,
                      "A Jinja chat template file to store as tokenizer.chat_template (default: ChatML)")
      ->check(CLI::ExistingFile);

  auto* path_cmd = app.add_subcommand("demo-model-path", "Print the demo model's path (generating it if missing)");
  bool models_json = false;
  auto* models_cmd = app.add_subcommand("models", "List the models on this machine (Ollama, Hugging Face cache, LM Studio)");
  models_cmd->add_flag("--json", models_json, "Print a JSON array");

  CLI11_PARSE(app, argc, argv);
  kvb::batch::SetLimits(limits);
  // The first -m is the model (the default one); the others go to the router.
  std::vector<std::string> run_more, serve_more, work_more;
  for (auto [models, model, more] : {std::tuple{&run_models, &run.model, &run_more},
                                     std::tuple{&serve_models, &serve.model, &serve_more},
                                     std::tuple{&work_models, &work.model, &work_more}}) {
    if (models->empty()) continue;
    *model = models->front();
    more->assign(models->begin() + 1, models->end());
  }

  if (*gen_cmd) return GenModel(preset, out, vocab, seed, type, chat_template, false);
  if (*models_cmd) return kvb::cli::ListModels(models_json);
  if (*serve_cmd) {
    if (serve.data_dir.empty()) serve.data_dir = (DataHome() / "serve").string();
    if (serve.server.api_key.empty()) {
      if (const char* k = std::getenv("KVBATCH_API_KEY")) serve.server.api_key = k;
    }
  }
  if (*worker_cmd && work.data_dir.empty()) work.data_dir = (DataHome() / "worker").string();
  // An API node on PostgreSQL may run without a model.
  const bool serve_needs_model = *serve_cmd && serve.model.empty() && !kvb::store::IsPostgresUri(serve.store);
  if (*path_cmd || (*run_cmd && run.model.empty()) || (*est_cmd && est.model.empty()) || serve_needs_model || (*worker_cmd && work.model.empty())) {
    fs::path demo = DemoModelPath();
    if (!fs::exists(demo)) {
      if (int rc = GenModel("bench", demo.string(), "", 42, "", "", false); rc != 0) return rc;
    }
    if (*path_cmd) {
      std::printf("%s\n", demo.c_str());
      return 0;
    }
    run.model = demo.string();
    if (est.model.empty()) est.model = demo.string();
    if (serve_needs_model) serve.model = demo.string();
    if (work.model.empty()) work.model = demo.string();
  }
  // -m: a path, or a model by name in another tool's store.
  auto resolve = [](std::string& model, std::string& name, std::string& source) {
    return model.empty() || kvb::cli::ResolveModelFlag(&model, &name, &source);
  };
  auto resolve_more = [](const std::vector<std::string>& more, std::vector<kvb::worker::ModelSpec>* specs) {
    for (std::string model : more) {
      std::string name, source = "path";
      if (!kvb::cli::ResolveModelFlag(&model, &name, &source)) return false;
      specs->push_back({name, model, source});
    }
    return true;
  };
  if (!resolve_more(run_more, &run.more_models) || !resolve_more(serve_more, &serve.more_models) ||
      !resolve_more(work_more, &work.more_models))
    return 1;
  if ((*run_cmd && !resolve(run.model, run.model_name, run.model_source)) ||
      (*serve_cmd && !resolve(serve.model, serve.model_name, serve.model_source)) ||
      (*worker_cmd && !resolve(work.model, work.model_name, work.model_source)) ||
      (*est_cmd && !resolve(est.model, est.model_name, est.model_source)))
    return 1;
  if (*worker_cmd) return kvb::cli::Worker(work);
  if (*est_cmd) return kvb::cli::Estimate(est);
  if (*serve_cmd) return kvb::cli::Serve(serve);
  return kvb::cli::Run(run);
}
