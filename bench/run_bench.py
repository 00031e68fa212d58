#!/usr/bin/env python3
"""The rubric benchmark: kvbatch run vs llama.cpp's llama-server vs a naive
one-at-a-time baseline, on the same model and workload, in one go.

  python3 bench/run_bench.py                    # CPU, 400 requests
  python3 bench/run_bench.py --gpu              # all layers on the GPU
  python3 bench/run_bench.py --schema           # kvbatch unconstrained vs JSON-schema output

Prints requests/s for each and the ratios; writes bench/results/<stamp>.json.
"""
import argparse
import datetime
import json
import os
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class LlamaServer:
    def __init__(self, binary, model, args, log_path):
        self.port = free_port()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port)] + args,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited early; see {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("llama-server did not become healthy")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_clients(url, bodies, clients):
    """Sends every body with `clients` concurrent connections; returns (seconds, completion tokens)."""
    q = queue.Queue()
    for b in bodies:
        q.put(b)
    tokens = [0]
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            try:
                body = q.get_nowait()
            except queue.Empty:
                return
            try:
                r = post(url, body)
                with lock:
                    tokens[0] += r["usage"].get("completion_tokens", 0)
            except Exception as e:  # keep going; report at the end
                errors.append(str(e))

    t0 = time.time()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return time.time() - t0, tokens[0]


class GpuMonitor:
    """Samples nvidia-smi (GPU utilisation %, memory used MiB) every 200 ms while a run lasts."""

    def __init__(self, enabled):
        self.proc = None
        if enabled and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self):
        if not self.proc:
            return {}
        self.proc.terminate()
        out, _ = self.proc.communicate()
        samples = []
        for line in out.splitlines():
            try:
                util, mem = (float(x) for x in line.split(","))
                samples.append((util, mem))
            except ValueError:
                pass
        if not samples:
            return {}
        busy = [u for u, _ in samples]
        return {"gpu_util_mean": statistics.mean(busy), "gpu_util_median": statistics.median(busy),
                "gpu_mem_peak_mib": max(m for _, m in samples), "gpu_samples": len(samples)}


STEP_LINE = re.compile(r"steps\s+(\d+), ([\d.]+) ms each: decode ([\d.]+) ms, host ([\d.]+) ms"
                       r"(?:; (\d+)% of tokens picked on the device)?")


def run_kvbatch(args, model, workload, out, output_args=("-q",), extra=()):
    """One `kvbatch run`; returns (seconds, completion tokens, finish reasons, output lines, command, info):
    info holds the step split from kvbatch's summary and, with --gpu, the GPU's utilisation."""
    if os.path.exists(out):
        os.remove(out)
    cmd = [args.kvbatch, "run", workload, "-o", out, "-m", model, "--threads", str(args.threads), *output_args] + \
        (["--gpu-layers", "0"] if not args.gpu else []) + args.kvbatch_args.split() + list(extra)
    mon = GpuMonitor(args.gpu)
    t0 = time.time()
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    secs = time.time() - t0
    info = mon.stop()
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"kvbatch run failed ({proc.returncode}): {' '.join(cmd)}")
    m = STEP_LINE.search(proc.stderr)
    if m:
        info.update({"steps": int(m.group(1)), "step_ms": float(m.group(2)), "decode_ms": float(m.group(3)),
                     "host_ms": float(m.group(4)), "device_picks_pct": float(m.group(5) or 0)})
    lines = [json.loads(l) for l in open(out)]
    assert len(lines) == args.requests, "kvbatch did not answer every request"
    toks = sum(l["response"]["body"]["usage"]["completion_tokens"] for l in lines)
    finish = {}
    for l in lines:
        r = l["response"]["body"]["choices"][0]["finish_reason"]
        finish[r] = finish.get(r, 0) + 1
    return secs, toks, finish, lines, " ".join(cmd), info


def answers(lines):
    return {l["custom_id"]: l["response"]["body"]["choices"][0]["message"]["content"] for l in lines}


def run_variant(args, model, workload, work, name, extra, base_secs):
    """kvbatch on the default run's file with `extra` arguments: its time against the default's and how many
    answers are the same as the default run's (kvbatch-out.jsonl)."""
    secs, _, _, lines, cmd, info = run_kvbatch(args, model, workload, os.path.join(work, f"kvbatch-{name}-out.jsonl"),
                                               output_args=("--progress-interval", "1000"), extra=extra)
    base = answers(json.loads(l) for l in open(os.path.join(work, "kvbatch-out.jsonl")))
    same = sum(1 for k, v in answers(lines).items() if base.get(k) == v)
    label = " ".join(extra)
    print(f"kvbatch run {label}: {args.requests} requests in {secs:.1f} s = {args.requests / secs:.2f} req/s "
          f"({secs / base_secs:.2f}x the default's time; {same}/{args.requests} answers the same) {info}", flush=True)
    return {"args": label, "seconds": secs, "req_s": args.requests / secs, "command": cmd, "same_answers": same,
            **info}


BOUND_RUNS = 5  # llama-batched-bench runs per rate of the shared-prefix bound (--bound-runs)


def batched_bench(binary, model, args, npp, ntg, npl):
    """One llama-batched-bench row: {PP, TG, B, N_KV, T_PP s, S_PP t/s, T_TG s, S_TG t/s, ...}."""
    cmd = [binary, "-m", model, "-c", str(max(4096, npl * (npp + ntg) + 256)), "-b", "2048", "-ub", "512",
           "-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl), "-fa", "on", "-t", str(args.threads),
           "--kv-unified"] + (["-ngl", "999"] if args.gpu else ["-ngl", "0"])
    runs = []
    for _ in range(args.bound_runs):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows = [l for l in out.splitlines() if l.startswith("|") and l.split("|")[1].strip().isdigit()]
        head = [h.strip() for h in next(l for l in out.splitlines() if l.startswith("|") and "PP" in l).split("|")[1:-1]]
        runs.append(dict(zip(head, (float(x) for x in rows[-1].split("|")[1:-1]))))
    # A run takes seconds, so one noisy moment moves it: each rate is the median of the runs.
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}, " ".join(cmd)


def prefix_bound(args, binary, model, out_path):
    """What the workload would take if the shared prefix cost nothing after its one prefill: the prefix
    prefilled once, then every request's own prompt tokens prefilled and its answer decoded at the
    rates llama.cpp reaches on a short context (llama-batched-bench, max-seqs sequences at once)."""
    lines = [json.loads(l)["response"]["body"]["usage"] for l in open(out_path)]
    n = len(lines)
    prompt = sum(u["prompt_tokens"] for u in lines) / n
    shared = max(u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in lines)
    own = max(1, round(prompt - shared))
    gen = max(1, round(sum(u["completion_tokens"] for u in lines) / n))
    seqs = 128 if args.gpu else 32
    pre, cmd1 = batched_bench(binary, model, args, shared, 1, 1)
    short, cmd2 = batched_bench(binary, model, args, own, gen, seqs)
    secs = shared / pre["S_PP t/s"] + n * own / short["S_PP t/s"] + n * gen / short["S_TG t/s"]
    return {"req_s": n / secs, "seconds": secs, "shared_tokens": shared, "own_tokens": own, "gen_tokens": gen,
            "prefix_prefill_tok_s": pre["S_PP t/s"], "short_prefill_tok_s": short["S_PP t/s"],
            "short_decode_tok_s": short["S_TG t/s"], "commands": [cmd1, cmd2]}


def schema_bench(args, work):
    """The rubric workload unconstrained vs with response_format json_schema: same
    requests, same max_tokens, alternating runs; the cost of grammar-constrained decoding."""
    model = args.model or os.path.join(work, "bench.gguf")
    if not args.model:
        sh([args.kvbatch, "gen-model", "--preset", "bench", "-o", model])
    files = {}
    for mode in ("plain", "schema"):
        files[mode] = os.path.join(work, f"rubric-{mode}.jsonl")
        sh([sys.executable, os.path.join(ROOT, "bench", "make_workload.py"), "--requests", str(args.requests),
            "--max-tokens", str(args.max_tokens), "--out", files[mode]] + (["--schema"] if mode == "schema" else []))
    runs = {"plain": [], "schema": []}
    valid = None
    for rnd in range(args.rounds):
        for mode in ("plain", "schema"):
            secs, toks, finish, lines, cmd, _ = run_kvbatch(args, model, files[mode],
                                                             os.path.join(work, f"out-{mode}.jsonl"))
            runs[mode].append({"seconds": secs, "req_s": args.requests / secs, "tok_s": toks / secs,
                               "completion_tokens": toks, "finish": finish, "command": cmd})
            print(f"round {rnd + 1} {mode:6s}: {secs:6.1f} s  {args.requests / secs:6.2f} req/s  "
                  f"{toks / secs:7.1f} completion tok/s  ({toks} tokens, {finish})", flush=True)
            if mode == "schema":
                valid = sum(1 for l in lines if l["response"]["body"]["choices"][0]["finish_reason"] != "stop"
                            or is_valid_score(l["response"]["body"]["choices"][0]["message"]["content"]))
    best = {m: min(r["seconds"] for r in runs[m]) for m in runs}
    tok = {m: max(r["tok_s"] for r in runs[m]) for m in runs}
    print(f"\nbest of {args.rounds}: plain {best['plain']:.1f} s, schema {best['schema']:.1f} s")
    print(f"schema / plain wall time     = {best['schema'] / best['plain']:.3f}")
    print(f"schema / plain tok/s         = {tok['schema'] / tok['plain']:.3f}  (per generated token)")
    print(f"schema answers: 'stop' ones all validate: {valid == args.requests}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out_dir, f"schema-{stamp}.json"), "w") as f:
        json.dump({"requests": args.requests, "max_tokens": args.max_tokens, "threads": args.threads,
                   "runs": runs, "wall_ratio": best["schema"] / best["plain"],
                   "tok_s_ratio": tok["schema"] / tok["plain"]}, f, indent=2)


def is_valid_score(text):
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and set(v) == {"score", "verdict", "reason"} and isinstance(v["score"], int)
            and 0 <= v["score"] <= 100 and v["verdict"] in ("hire", "maybe", "reject")
            and isinstance(v["reason"], str) and len(v["reason"]) <= 80)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--naive-requests", type=int, default=40, help="the naive baseline runs this many (it is slow)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", default="16",
                    help="llama-server slots and concurrent clients; a comma list sweeps them (the best is compared)")
    ap.add_argument("--server-kv", default="split",
                    help="llama-server KV layout(s), comma list of split (--no-kv-unified) and unified")
    ap.add_argument("--bound-runs", type=int, default=BOUND_RUNS,
                    help="llama-batched-bench runs per rate of the bound (the median is taken)")
    ap.add_argument("--ab-args", default="",
                    help="also run kvbatch with these extra arguments on the same file and report the ratio")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds: once spent, the remaining llama-server configurations are skipped (0: none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gpu", action="store_true", help="offload all layers (llama-server -ngl 999)")
    ap.add_argument("--kvbatch", default=os.path.join(ROOT, "build", "kvbatch"))
    ap.add_argument("--llama-server", default=None, help="default: the one scripts/llama.sh built")
    ap.add_argument("--model", default=None, help="default: a generated bench model")
    ap.add_argument("--kvbatch-args", default="", help="extra arguments for kvbatch run")
    ap.add_argument("--skip", default="", help="comma list of: kvbatch,server,naive,bound")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--schema", action="store_true",
                    help="instead: kvbatch on the same requests without and with response_format json_schema")
    ap.add_argument("--deterministic", action="store_true",
                    help="also run kvbatch with --deterministic on the same file and report its cost")
    ap.add_argument("--rounds", type=int, default=2, help="--schema: alternating rounds of both runs")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out_dir, exist_ok=True)
    work = os.path.join(args.out_dir, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    if args.schema:
        return schema_bench(args, work)

    server_bin = args.llama_server
    if server_bin is None:
        prefix = subprocess.run(["bash", os.path.join(ROOT, "scripts", "llama.sh")], check=True,
                                capture_output=True, text=True).stdout.strip()
        server_bin = os.path.join(prefix, "bin", "llama-server")
    model = args.model or os.path.join(work, "bench.gguf")
    if not args.model:
        sh([args.kvbatch, "gen-model", "--preset", "bench", "-o", model])

    workload = os.path.join(work, "rubric.jsonl")
    sh([sys.executable, os.path.join(ROOT, "bench", "make_workload.py"), "--requests", str(args.requests),
        "--max-tokens", str(args.max_tokens), "--out", workload])
    bodies = [json.loads(l)["body"] for l in open(workload)]
    results = {"requests": args.requests, "max_tokens": args.max_tokens, "threads": args.threads,
               "gpu": args.gpu, "parallel": args.parallel}
    ngl = ["-ngl", "999"] if args.gpu else ["-ngl", "0"]

    started = time.time()
    if "kvbatch" not in skip:
        secs, toks, _, _, cmd, info = run_kvbatch(args, model, workload, os.path.join(work, "kvbatch-out.jsonl"),
                                                  output_args=("--progress-interval", "5"))
        results["kvbatch"] = {"seconds": secs, "req_s": args.requests / secs, "completion_tokens": toks,
                              "command": cmd, **info}
        print(f"kvbatch run: {args.requests} requests in {secs:.1f} s = {args.requests / secs:.2f} req/s {info}",
              flush=True)
        # The same file run another way: --deterministic, --ab-args.
        variants = [("kvbatch_deterministic", "det", ["--deterministic"])] if args.deterministic else []
        if args.ab_args:
            variants.append(("kvbatch_ab", "ab", args.ab_args.split()))
        for key, name, extra in variants:
            results[key] = run_variant(args, model, workload, work, name, extra, secs)

    if "server" not in skip:
        ctx_per_slot = 2304
        sweep = []
        for np_ in (int(x) for x in str(args.parallel).split(",")):
            for kv in args.server_kv.split(","):
                sweep.append((np_, kv))
        runs = []
        for np_, kv in sweep:
            if args.time_budget and time.time() - started > args.time_budget:
                print(f"llama-server -np {np_} {kv} KV: skipped (--time-budget {args.time_budget:.0f} s spent)",
                      flush=True)
                continue
            srv_args = ["-np", str(np_), "-c", str(ctx_per_slot * np_),
                        "--no-kv-unified" if kv == "split" else "--kv-unified",
                        "-fa", "on", "-t", str(args.threads), "-tb", str(args.threads), "--no-webui"] + ngl
            srv = LlamaServer(server_bin, model, srv_args, os.path.join(work, f"llama-server-{np_}-{kv}.log"))
            try:
                reqs = [dict(b, cache_prompt=True) for b in bodies]
                secs, toks = run_clients(f"http://127.0.0.1:{srv.port}/v1/chat/completions", reqs, np_)
            finally:
                srv.close()
            runs.append({"parallel": np_, "kv": kv, "seconds": secs, "req_s": args.requests / secs,
                         "completion_tokens": toks, "command": "llama-server " + " ".join(srv_args)})
            print(f"llama-server -np {np_} ({kv} KV): {args.requests} requests in {secs:.1f} s = "
                  f"{args.requests / secs:.2f} req/s", flush=True)
        if runs:
            best = max(runs, key=lambda r: r["req_s"])
            results["llama_server"] = dict(best, sweep=runs)

    if "naive" not in skip:
        n = min(args.naive_requests, args.requests)
        srv_args = ["-np", "1", "-c", "2304", "-fa", "on", "-t", str(args.threads), "-tb", str(args.threads),
                    "--no-webui", "--cache-ram", "0"] + ngl
        srv = LlamaServer(server_bin, model, srv_args, os.path.join(work, "llama-server-naive.log"))
        try:
            reqs = [dict(b, cache_prompt=False) for b in bodies[:n]]
            secs, toks = run_clients(f"http://127.0.0.1:{srv.port}/v1/chat/completions", reqs, 1)
        finally:
            srv.close()
        results["naive"] = {"seconds": secs, "req_s": n / secs, "requests": n, "completion_tokens": toks,
                            "command": "llama-server " + " ".join(srv_args) + " (cache_prompt=false, 1 client)"}
        print(f"naive (one at a time, no prompt cache): {n} requests in {secs:.1f} s = {n / secs:.2f} req/s",
              flush=True)

    if "bound" not in skip and "kvbatch" in results:
        bench_bin = os.path.join(os.path.dirname(server_bin), "llama-batched-bench")
        b = prefix_bound(args, bench_bin, model, os.path.join(work, "kvbatch-out.jsonl"))
        results["shared_prefix_bound"] = b
        print(f"shared-prefix bound: {b['req_s']:.2f} req/s (prefix {b['shared_tokens']} tokens once at "
              f"{b['prefix_prefill_tok_s']:.0f} tok/s; per request {b['own_tokens']} own tokens at "
              f"{b['short_prefill_tok_s']:.0f} tok/s and {b['gen_tokens']} generated at "
              f"{b['short_decode_tok_s']:.0f} tok/s)", flush=True)

    print("\n| system | req/s | vs kvbatch |")
    print("|---|---|---|")
    base = results.get("kvbatch", {}).get("req_s")
    server_label = "llama-server"
    if "llama_server" in results:
        server_label = f"llama-server -np {results['llama_server']['parallel']} ({results['llama_server']['kv']} KV)"
    for key, label in [("kvbatch", "kvbatch run"), ("llama_server", server_label),
                       ("naive", "naive, one at a time")]:
        if key in results:
            r = results[key]["req_s"]
            ratio = f"{base / r:.2f}x slower" if base and key != "kvbatch" else "-"
            print(f"| {label} | {r:.2f} | {ratio} |")
    if base and "llama_server" in results:
        print(f"\nkvbatch / llama-server = {base / results['llama_server']['req_s']:.2f}x")
    if base and "naive" in results:
        print(f"kvbatch / naive        = {base / results['naive']['req_s']:.2f}x")
    if base and "shared_prefix_bound" in results:
        print(f"kvbatch / shared-prefix bound = {base / results['shared_prefix_bound']['req_s']:.0%}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out_dir, f"{stamp}.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
