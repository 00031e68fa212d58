// kvbatch: OpenAI-style batch inference on your own hardware.
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <filesystem>

#include "cli/run_command.h"
#include "tools/gen_model.h"

namespace fs = std::filesystem;

namespace {

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
             const std::string& type, bool quiet) {
  auto opts = kvb::tools::ModelPreset(preset);
  if (!opts.ok()) {
    std::fprintf(stderr, "kvbatch: %s\n", opts.status().message().c_str());
    return 2;
  }
  opts->out_path = out;
  opts->vocab_path = vocab.empty() ? (VocabDir() / "ggml-vocab-llama-spm.gguf").string() : vocab;
  opts->seed = seed;
  if (type == "f16") opts->weight_type = GGML_TYPE_F16;
  else if (type == "f32") opts->weight_type = GGML_TYPE_F32;
  else if (type == "q8_0") opts->weight_type = GGML_TYPE_Q8_0;
  else if (!type.empty()) {
    std::fprintf(stderr, "kvbatch: unknown weight type %s (q8_0, f16, f32)\n", type.c_str());
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvbatch: OpenAI-style batch inference with shared-prefix KV reuse, on llama.cpp"};
  app.require_subcommand(1);

  kvb::cli::RunOptions run;
  auto* run_cmd = app.add_subcommand("run", "Run an OpenAI Batch API input file (JSONL) offline");
  run_cmd->add_option("input", run.input, "Input JSONL: one {custom_id, method, url, body} per line")
      ->required()
      ->check(CLI::ExistingFile);
  run_cmd->add_option("-o,--output", run.output, "Output JSONL (appended as results finish; resumable)")->required();
  run_cmd->add_option("-e,--errors", run.errors, "Error JSONL for failed requests (default: the output file)");
  run_cmd->add_option("-m,--model", run.model, "GGUF model (default: the generated demo model)");
  run_cmd->add_flag("--skip-invalid", run.skip_invalid, "Run the valid lines; write invalid ones to the error file");
  run_cmd->add_option("--default-max-tokens", run.default_max_tokens,
                      "max_tokens for requests without one (0: until the context is full)")
      ->capture_default_str();
  run_cmd->add_option("--max-seqs", run.engine.context.max_seqs, "Parallel sequences (default: 32 on CPU, 128 on GPU)");
  run_cmd->add_option("--kv-cells", run.engine.context.kv_cells, "KV cache cells (default: sized from free memory)");
  run_cmd->add_option("--batch-tokens", run.engine.context.n_batch, "Tokens per engine step (decode + prefill chunks)")
      ->capture_default_str();
  run_cmd->add_option("--ubatch-tokens", run.engine.context.n_ubatch,
                      "Tokens per llama.cpp micro-batch (default: --batch-tokens on CPU, 512 on GPU)");
  run_cmd->add_option("--threads", run.engine.context.n_threads, "CPU threads (default: all cores)");
  run_cmd->add_option("--gpu-layers", run.n_gpu_layers, "Layers on the GPU (-1: all)")->capture_default_str();
  run_cmd->add_option("--anchors", run.engine.context.anchors, "Sequences reserved for shared prefixes")->capture_default_str();
  run_cmd->add_option("--kv-type", run.engine.context.kv_type, "KV cache type: f16, f32 or q8_0")->capture_default_str();
  run_cmd->add_option("--flash-attn", run.engine.context.flash_attn, "Flash attention (true/false)")->capture_default_str();
  run_cmd->add_flag("-q,--quiet", run.quiet, "No progress or summary");
  run_cmd->add_option("--progress-interval", run.progress_interval, "Seconds between progress lines when not on a terminal")
      ->capture_default_str();

  std::string preset = "tiny", out, vocab, type;
  uint64_t seed = 42;
  auto* gen_cmd = app.add_subcommand("gen-model", "Write a llama-architecture GGUF with random weights and a real tokenizer");
  gen_cmd->add_option("--preset", preset, "tiny (~5 MB, tests) or bench (~60 MB)")->capture_default_str();
  gen_cmd->add_option("-o,--output", out, "Output .gguf")->required();
  gen_cmd->add_option("--vocab", vocab, "Tokenizer vocabulary GGUF (default: llama.cpp's ggml-vocab-llama-spm.gguf)");
  gen_cmd->add_option("--seed", seed, "Weight seed")->capture_default_str();
  gen_cmd->add_option("--type", type, "Matrix type: q8_0, f16 or f32 (default: the preset's)");

  auto* path_cmd = app.add_subcommand("demo-model-path", "Print the demo model's path (generating it if missing)");

  CLI11_PARSE(app, argc, argv);

  if (*gen_cmd) return GenModel(preset, out, vocab, seed, type, false);
  if (*path_cmd || (*run_cmd && run.model.empty())) {
    fs::path demo = DemoModelPath();
    if (!fs::exists(demo)) {
      if (int rc = GenModel("bench", demo.string(), "", 42, "", false); rc != 0) return rc;
    }
    if (*path_cmd) {
      std::printf("%s\n", demo.c_str());
      return 0;
    }
    run.model = demo.string();
  }
  return kvb::cli::Run(run);
}
