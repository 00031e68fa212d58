#!/usr/bin/env python3
"""The embeddings benchmark: an embeddings batch through `kvbatch run` vs
llama.cpp's llama-server /v1/embeddings, on the same generated BERT model
(bge-small's shape: `kvbatch gen-model --preset bert-small`) and inputs.

  python3 bench/embed_bench.py                   # 4,000 inputs
  python3 bench/embed_bench.py --inputs 100000   # the "every record" case

kvbatch: one JSONL line per input (the Batch API file), wall time of the
command, model load included. llama-server: `--embeddings -np N`, N
concurrent clients, once with one input per request and once with 32
inputs per request (its best case); the faster counts. Prints inputs/s and
the ratio; writes bench/results/embed-<stamp>.json.
"""
import argparse
import datetime
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_bench import ROOT, LlamaServer, run_clients, sh  # noqa: E402

WORDS = ("logistics warehouse customs invoice delivery shipment parcel route carrier freight pallet "
         "experience leadership team budget forecast supplier contract audit safety quality schedule "
         "inventory dispatch tracking port rail truck air ocean express returns claims compliance").split()


def make_inputs(n, seed=7):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 48))) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=4000)
    ap.add_argument("--parallel", type=int, default=8, help="llama-server slots and concurrent clients")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--kvbatch", default=os.path.join(ROOT, "build", "kvbatch"))
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--model", default=None, help="default: a generated bert-small model")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()

    work = os.path.join(ROOT, "build", "bench-embed")
    os.makedirs(work, exist_ok=True)
    model = args.model or os.path.join(work, "bert-small.gguf")
    if not os.path.exists(model):
        sh([args.kvbatch, "gen-model", "--preset", "bert-small", "-o", model])
    server_bin = args.llama_server
    if server_bin is None:
        prefix = sh(["bash", os.path.join(ROOT, "scripts", "llama.sh")], capture_output=True, text=True).stdout.strip()
        server_bin = os.path.join(prefix, "bin", "llama-server")
    texts = make_inputs(args.inputs)
    results = {}

    workload = os.path.join(work, "inputs.jsonl")
    with open(workload, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "bert", "input": t}}) + "\n")
    out = os.path.join(work, "out.jsonl")
    for p in (out, out + ".inflight"):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.time()
    sh([args.kvbatch, "run", workload, "-o", out, "-m", model, "-q", "--threads", str(args.threads)])
    secs = time.time() - t0
    with open(out) as f:
        ok = sum(1 for line in f if json.loads(line)["response"]["status_code"] == 200)
    assert ok == len(texts), f"kvbatch answered {ok} of {len(texts)}"
    results["kvbatch"] = {"seconds": secs, "inputs_s": len(texts) / secs}
    print(f"kvbatch run: {len(texts)} inputs in {secs:.1f} s = {len(texts) / secs:.1f} inputs/s", flush=True)

    server = LlamaServer(server_bin, model, ["--embeddings", "-np", str(args.parallel), "-c", str(512 * args.parallel),
                                             "-b", "4096", "-ub", "4096", "-t", str(args.threads)],
                         os.path.join(work, "llama-server.log"))
    try:
        url = f"http://127.0.0.1:{server.port}/v1/embeddings"
        for per in (1, 32):
            bodies = [{"model": "bert", "input": texts[i:i + per] if per > 1 else texts[i]}
                      for i in range(0, len(texts), per)]
            t0 = time.time()
            run_clients(url, bodies, args.parallel)
            secs = time.time() - t0
            results[f"llama_server_{per}"] = {"seconds": secs, "inputs_s": len(texts) / secs}
            print(f"llama-server -np {args.parallel}, {per} input(s) per request: {len(texts) / secs:.1f} inputs/s",
                  flush=True)
    finally:
        server.close()

    best = max(results["llama_server_1"]["inputs_s"], results["llama_server_32"]["inputs_s"])
    ratio = results["kvbatch"]["inputs_s"] / best
    print(f"\nkvbatch / llama-server (best) = {ratio:.2f}x")
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out_dir, f"embed-{stamp}.json"), "w") as f:
        json.dump({"inputs": len(texts), "threads": args.threads, "parallel": args.parallel, "results": results,
                   "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
