// Shared helpers for the end-to-end API tests of `kvbatch serve`: a tiny
// generated model, server processes (started on a free port, stopped with
// SIGTERM, SIGKILL as a fallback), input files and batch polling.
import { spawn, execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';

const execFileP = promisify(execFile);

export const KVBATCH_BIN = process.env.KVBATCH_BIN || '/work/main/build/kvbatch';
export const VOCAB_DIR =
  process.env.KVBATCH_VOCAB_DIR || '/root/.cache/kvbatch/llama-nlc3.22.1-cpu-496b83d1/share/vocab';

export function childEnv() {
  return { ...process.env, KVBATCH_VOCAB_DIR: VOCAB_DIR };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// `promise`, or `onTimeout` after ms; the timer never keeps the process alive.
export function withTimeout(promise, ms, onTimeout = null) {
  let timer;
  const t = new Promise((r) => {
    timer = setTimeout(() => r(onTimeout), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

// A fresh temporary directory holding tiny.gguf.
export async function makeWorkDir(prefix = 'kvbatch-api-') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const model = path.join(dir, 'tiny.gguf');
  await execFileP(KVBATCH_BIN, ['gen-model', '--preset', 'tiny', '-o', model], { env: childEnv() });
  return { dir, model };
}

export function removeDir(dir) {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
}

const running = new Set();
// Last resort: no orphan servers if a test file dies without its after().
process.on('exit', () => {
  for (const s of running) {
    try {
      s.proc.kill('SIGKILL');
    } catch {}
  }
});

// Starts `kvbatch serve` and resolves once it prints its listening line.
// Returns { proc, pid, port, baseURL, dataDir, client(apiKey?), stdout(), stderr(), exited }.
// One engine thread by default: several servers (and a compiler) share two
// cores, and llama.cpp's spinning worker threads oversubscribe them badly.
// Without `model` (an API node on a PostgreSQL store: extraArgs has --store)
// no -m is passed.
export function startServer({
  model, dataDir, maxSeqs = 4, defaultMaxTokens = 16, threads = 1, extraArgs = [], timeoutMs = 30000, env: extraEnv = {},
}) {
  const args = [
    'serve', ...(model ? ['-m', model] : []), '--port', '0', '--data-dir', dataDir, '--max-seqs', String(maxSeqs),
    '--default-max-tokens', String(defaultMaxTokens), '--threads', String(threads), ...extraArgs,
  ];
  const env = { ...childEnv(), ...extraEnv };
  delete env.KVBATCH_API_KEY;
  const proc = spawn(KVBATCH_BIN, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const server = {
    proc, pid: proc.pid, dataDir, exited,
    stdout: () => out, stderr: () => err,
  };
  running.add(server);
  exited.then(() => running.delete(server));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`kvbatch serve did not start in ${timeoutMs} ms\nstdout: ${out}\nstderr: ${err}`));
    }, timeoutMs);
    proc.stderr.on('data', (d) => { err += d; });
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /listening on http:\/\/127\.0\.0\.1:(\d+)\/v1/.exec(out);
      if (m && !server.port) {
        clearTimeout(timer);
        server.port = Number(m[1]);
        server.baseURL = `http://127.0.0.1:${server.port}/v1`;
        server.client = (apiKey = 'unused') =>
          new OpenAI({ baseURL: server.baseURL, apiKey, maxRetries: 0, timeout: 60000 });
        resolve(server);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      if (!server.port) reject(new Error(`kvbatch serve exited (${code ?? signal}) before listening\nstderr: ${err}`));
    });
  });
}

// SIGTERM, then SIGKILL after graceMs. Resolves with { code, signal }.
export async function stopServer(server, graceMs = 5000) {
  if (!server || !server.proc) return null;
  if (server.proc.exitCode !== null || server.proc.signalCode !== null) return server.exited;
  server.proc.kill('SIGTERM');
  const r = await withTimeout(server.exited, graceMs, null);
  if (r) return r;
  server.proc.kill('SIGKILL');
  return server.exited;
}

export function jsonl(rows) {
  return rows.map((r) => (typeof r === 'string' ? r : JSON.stringify(r))).join('\n') + '\n';
}

// Writes rows (objects, or raw strings for malformed lines) as JSONL; returns the path.
export function makeInputFile(dir, name, rows) {
  const p = path.join(dir, name);
  fs.writeFileSync(p, jsonl(rows));
  return p;
}

export const SYSTEM_PROMPT =
  'You are a meticulous assistant for a logistics company. You answer questions about shipments, ' +
  'warehouses, delivery windows, customs paperwork and invoices. Keep every answer short and precise, ' +
  'cite the relevant policy section when you can, and never invent tracking numbers or dates. ' +
  'If a question is ambiguous, state the assumption you make before answering it.';

export function chatLine(customId, question, body = {}) {
  return {
    custom_id: customId,
    method: 'POST',
    url: '/v1/chat/completions',
    body: {
      model: 'tiny',
      messages: [
        { role: 'system', content: SYSTEM_PROMPT },
        { role: 'user', content: question },
      ],
      ...body,
    },
  };
}

export function chatRows(n, { prefix = 'req-', body = {} } = {}) {
  const rows = [];
  for (let i = 0; i < n; i++) rows.push(chatLine(`${prefix}${i}`, `Question number ${i}: where is parcel ${i * 7}?`, body));
  return rows;
}

export async function uploadFile(client, filePath) {
  return client.files.create({ file: fs.createReadStream(filePath), purpose: 'batch' });
}

// Polls batches.retrieve until the status is one of `statuses`; returns the batch.
// `until` (optional) is a predicate on the batch that also ends the wait.
export async function waitForBatch(client, id, statuses, timeoutMs = 45000, { intervalMs = 150, until } = {}) {
  const want = Array.isArray(statuses) ? statuses : [statuses];
  const deadline = Date.now() + timeoutMs;
  let b;
  for (;;) {
    b = await client.batches.retrieve(id);
    if (want.includes(b.status) || (until && until(b))) return b;
    if (Date.now() > deadline)
      throw new Error(`batch ${id} still '${b.status}' after ${timeoutMs} ms (wanted ${want.join('|')}): ` +
        JSON.stringify(b.request_counts));
    await sleep(intervalMs);
  }
}

export function parseJsonl(text) {
  return text.split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l));
}

export async function fileText(client, fileId) {
  if (!fileId) return '';
  const r = await client.files.content(fileId);
  return r.text();
}

// Output and error lines of a finished batch.
export async function batchResults(client, batch) {
  const output = parseJsonl(await fileText(client, batch.output_file_id));
  const errors = parseJsonl(await fileText(client, batch.error_file_id));
  return { output, errors };
}

// Every custom_id of `ids` exactly once across the lines.
export function assertCoverage(assert, ids, lines) {
  const seen = new Map();
  for (const l of lines) seen.set(l.custom_id, (seen.get(l.custom_id) || 0) + 1);
  for (const [id, n] of seen) assert.equal(n, 1, `custom_id ${id} appears ${n} times`);
  assert.deepEqual([...seen.keys()].sort(), [...ids].sort());
}

// Runs `kvbatch run` on an input file; returns the parsed output lines.
export async function kvbatchRun(model, input, out, args = []) {
  await execFileP(KVBATCH_BIN, ['run', input, '-o', out, '-m', model, '-q', ...args], {
    env: childEnv(),
    maxBuffer: 64 << 20,
  });
  return parseJsonl(fs.readFileSync(out, 'utf8'));
}

export function contentOf(line) {
  const body = line.response && line.response.body;
  if (!body || !body.choices) return undefined;
  const c = body.choices[0];
  return c.message ? c.message.content : c.text;
}

// ---- Raw HTTP for the hostile-input tests (hostile.test.mjs) ----------------
// (import declarations are hoisted; this one only adds node:net)
import net from 'node:net';

// fetch to 127.0.0.1:port with a deadline; never throws for HTTP statuses.
// Returns { status, body (parsed JSON or undefined), text, headers }.
// `json`: serialised with Content-Type application/json; `body`: sent as is
// (a string gets Content-Type application/json unless `headers` name one).
export async function httpCall(port, method, p, { json, body, headers = {}, timeoutMs = 30000 } = {}) {
  const init = { method, headers: { ...headers }, signal: AbortSignal.timeout(timeoutMs) };
  const hasType = Object.keys(init.headers).some((k) => k.toLowerCase() === 'content-type');
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    if (!hasType) init.headers['Content-Type'] = 'application/json';
  } else if (body !== undefined) {
    init.body = body;
    if (!hasType && typeof body === 'string') init.headers['Content-Type'] = 'application/json';
  }
  const res = await fetch(`http://127.0.0.1:${port}${p}`, init);
  const text = await res.text();
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  return { status: res.status, body: parsed, text, headers: res.headers };
}

// Writes `chunks` (strings or Buffers) on a fresh TCP connection, then
// half-closes it (`end`), or resets it at once (`destroy`). Resolves when the
// server has sent a whole response head, closed, or after timeoutMs:
// { status (number, or null without a status line), head, closed, timedOut, error }.
export function rawHttp(port, chunks, { timeoutMs = 5000, end = true, destroy = false } = {}) {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    let data = Buffer.alloc(0);
    let done = false;
    let closed = false;
    let error = null;
    const finish = (timedOut) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      const text = data.toString('latin1');
      const m = /^HTTP\/\d(?:\.\d)? (\d{3})/.exec(text);
      sock.destroy();
      resolve({ status: m ? Number(m[1]) : null, head: text.slice(0, 300), closed, timedOut, error });
    };
    const timer = setTimeout(() => finish(true), timeoutMs);
    sock.on('connect', async () => {
      for (const c of chunks) {
        if (done) return;
        if (!sock.write(c)) await new Promise((r) => sock.once('drain', r));
      }
      if (destroy) {
        closed = true;
        finish(false);
      } else if (end) {
        sock.end();
      }
    });
    sock.on('data', (d) => {
      data = Buffer.concat([data, d]);
      if (data.includes('\r\n\r\n')) finish(false);
    });
    sock.on('error', (e) => {
      error = e.code || e.message;
      closed = true;
      finish(false);
    });
    sock.on('close', () => {
      closed = true;
      finish(false);
    });
  });
}

// A connection that has written `text` and stays open; resolves with the socket.
export function openSocket(port, text) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1', () => sock.write(text, () => resolve(sock)));
    sock.on('error', reject);
  });
}

// VmRSS and VmHWM (peak RSS) of a live process, in bytes.
export function procMemory(pid) {
  const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k) => {
    const m = new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s);
    return m ? Number(m[1]) * 1024 : null;
  };
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

// ---- Scale-out: workers and a private PostgreSQL (scaleout.test.mjs) --------

// Starts `kvbatch worker` and resolves once it prints its running line.
// Returns { proc, pid, dataDir, stdout(), stderr(), exited, startedAt };
// stopServer stops it (SIGTERM: it prints its stats line, see workerStats).
export function startWorker({ model, store, dataDir, threads = 1, extraArgs = [], timeoutMs = 30000 }) {
  const args = ['worker', '--store', store, '-m', model, '--data-dir', dataDir, '--threads', String(threads), ...extraArgs];
  const proc = spawn(KVBATCH_BIN, args, { env: childEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const w = { proc, pid: proc.pid, dataDir, exited, stdout: () => out, stderr: () => err, startedAt: Date.now() };
  running.add(w);
  exited.then(() => running.delete(w));
  return new Promise((resolve, reject) => {
    let ready = false;
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`kvbatch worker did not start in ${timeoutMs} ms\nstdout: ${out}\nstderr: ${err}`));
    }, timeoutMs);
    proc.stderr.on('data', (d) => { err += d; });
    proc.stdout.on('data', (d) => {
      out += d;
      if (!ready && /kvbatch worker: running batches/.test(out)) {
        ready = true;
        clearTimeout(timer);
        w.startedAt = Date.now();
        resolve(w);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      if (!ready) reject(new Error(`kvbatch worker exited (${code ?? signal}) before running\nstderr: ${err}`));
    });
  });
}

// The stats line a worker prints on SIGTERM, parsed; null if there is none.
export function workerStats(stderr) {
  const m = /kvbatch worker: (\d+) chunks claimed \((\d+) prefix groups\), (\d+) results committed, (\d+) chunks lost, (\d+) results dropped/
    .exec(stderr);
  if (!m) return null;
  const [claimed, prefixGroups, committed, lost, dropped] = m.slice(1).map(Number);
  return { claimed, prefixGroups, committed, lost, dropped };
}

const PG_SCRIPT = fileURLToPath(new URL('../../scripts/pg_test_server.sh', import.meta.url));

// scripts/pg_test_server.sh start DIR OWNER_PID: (re)starts the private
// server whose cluster and socket live in DIR (DIR under /tmp: short enough
// for a socket path and reachable by the `postgres` user when run as root);
// resolves with its URI (the same on every start in DIR).
export async function pgStart(dir, ownerPid = process.pid) {
  try {
    const { stdout } = await execFileP(PG_SCRIPT, ['start', dir, String(ownerPid)], { timeout: 120000 });
    return stdout.trim().split('\n').pop();
  } catch (e) {
    const why = e.code === 3
      ? 'PostgreSQL server binaries are missing: install the Debian package \'postgresql\' (scripts/packages.sh). '
      : '';
    throw new Error(`${why}pg_test_server.sh start ${dir} failed: ${e.stderr || e.message}`);
  }
}

export async function pgStop(dir) {
  await execFileP(PG_SCRIPT, ['stop', dir], { timeout: 120000 });
}

// psql from the server's bin dir (PG_BIN, else the newest /usr/lib/postgresql/*/bin).
export function psqlPath() {
  if (process.env.PG_BIN) return path.join(process.env.PG_BIN, 'psql');
  let root;
  try {
    root = fs.readdirSync('/usr/lib/postgresql');
  } catch {
    root = [];
  }
  const versions = root.filter((v) => fs.existsSync(`/usr/lib/postgresql/${v}/bin/psql`))
    .sort((a, b) => Number.parseFloat(a) - Number.parseFloat(b));
  return versions.length ? `/usr/lib/postgresql/${versions.at(-1)}/bin/psql` : 'psql';
}

// Runs `sql` through psql (unaligned, tuples only, '|' between fields, errors
// fatal); resolves with the rows as arrays of strings.
export async function psql(uri, sql, { timeoutMs = 15000 } = {}) {
  const { stdout } = await execFileP(psqlPath(),
    ['-X', '-q', '-A', '-t', '-F', '|', '-v', 'ON_ERROR_STOP=1', '-d', uri, '-c', sql],
    { timeout: timeoutMs, maxBuffer: 16 << 20 });
  return stdout.split('\n').filter((l) => l !== '').map((l) => l.split('|'));
}
