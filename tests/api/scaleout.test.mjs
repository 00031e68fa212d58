// Scale-out end to end: one API node without a model and three workers on a
// private PostgreSQL run a 600-request batch (6 shared system prompts x 100
// users) through the OpenAI SDK while one worker is killed with SIGKILL in
// the middle of a chunk, another is paused with SIGSTOP past its lease (its
// chunk is taken over; once resumed its stale commits are refused by the
// fencing token) and PostgreSQL itself is restarted. The batch still
// completes with every custom_id exactly once and usage counted once.
//
// Reports (test output): reclaim time after the kill, requests recomputed,
// throughput per worker and in total, prefix groups claimed per worker.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import * as h from './helpers.mjs';

const PREFIXES = 6;
const USERS = 100;
const N = PREFIXES * USERS;
const CHUNK_ROWS = 25;
const LEASE_S = 3;
// Each node (API and workers: any node's keeper may validate the batch) cuts
// chunks of 25 rows. A small engine window: a worker holds about one chunk
// at a time, so chunks keep moving between workers (the default window of
// 2 x 32 sequences + 64 would let three workers take 18 of the 24 chunks at
// once).
const NODE_ARGS = ['--chunk-rows', String(CHUNK_ROWS), '--lease-seconds', String(LEASE_S)];
const WORKER_ARGS = [...NODE_ARGS, '--max-seqs', '8', '--window', '16'];
const DEADLINE_MS = 150000;

let work;
let pgDir;
let api;
const workers = []; // { w, name, killedAt?, stoppedAt? }
const t0 = Date.now();
const timeline = [];
const note = (what) => {
  const line = `+${((Date.now() - t0) / 1000).toFixed(2)}s ${what}`;
  timeline.push(line);
  console.log(line);
};

after(async () => {
  for (const { w } of workers) {
    try {
      w.proc.kill('SIGCONT');
    } catch {}
  }
  await Promise.all(workers.map(({ w }) => h.stopServer(w, 10000)));
  await h.stopServer(api);
  if (pgDir) {
    await h.pgStop(pgDir).catch((e) => console.log(`pg stop: ${e.message}`));
    h.removeDir(pgDir);
  }
  h.removeDir(work && work.dir);
});

function systemPrompt(k) {
  return `Policy book ${k}: you are assistant number ${k} of a logistics company. ` + h.SYSTEM_PROMPT;
}

// 32 tokens an answer: the batch runs for ~20 s on two cores, long enough for
// the three incidents to happen while it runs.
function rows() {
  const out = [];
  // Interleaved in the file: the validation groups them by prefix.
  for (let i = 0; i < N; i++) {
    const k = i % PREFIXES;
    out.push({
      custom_id: `so-${k}-${i}`,
      method: 'POST',
      url: '/v1/chat/completions',
      body: {
        model: 'tiny',
        messages: [
          { role: 'system', content: systemPrompt(k) },
          { role: 'user', content: `Customer ${i} asks: where is parcel ${i * 13}?` },
        ],
        max_tokens: 32,
      },
    });
  }
  return out;
}

// Polls `fn` until `cond(value)` holds; errors (the database restarting) are
// retried until the deadline. Resolves with the value.
async function waitFor(what, fn, cond, timeoutMs, intervalMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  let lastErr;
  for (;;) {
    try {
      last = await fn();
      lastErr = undefined;
      if (cond(last)) return last;
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(last)}` +
        (lastErr ? `; last error: ${lastErr.message}` : ''));
    await h.sleep(intervalMs);
  }
}

// Chunks of the batch with a lease (lease_until > 0) and rows pending.
async function heldChunks(uri, batchId) {
  const r = await h.psql(uri,
    `SELECT chunk, token, lease_owner, pending, reclaims FROM chunks WHERE batch_id = '${batchId}' ` +
    'AND lease_until > 0 AND pending > 0 ORDER BY chunk');
  return r.map(([chunk, token, owner, pending, reclaims]) => ({
    chunk: Number(chunk), token: Number(token), owner, pending: Number(pending), reclaims: Number(reclaims),
    pid: Number((/:(\d+):[^:]*$/.exec(owner) || [])[1]),
  }));
}

async function chunkStates(uri, batchId, chunks) {
  const r = await h.psql(uri,
    `SELECT chunk, token, lease_owner, pending FROM chunks WHERE batch_id = '${batchId}' ` +
    `AND chunk IN (${chunks.join(',')}) ORDER BY chunk`);
  return new Map(r.map(([chunk, token, owner, pending]) => [Number(chunk),
    { token: Number(token), owner, pending: Number(pending), pid: Number((/:(\d+):[^:]*$/.exec(owner) || [])[1]) }]));
}

function nameOf(pid) {
  const e = workers.find(({ w }) => w.pid === pid);
  return e ? e.name : `pid ${pid}`;
}

async function addWorker(uri, name) {
  const w = await h.startWorker({
    model: work.model, store: uri, dataDir: path.join(work.dir, name), extraArgs: WORKER_ARGS,
  });
  workers.push({ w, name });
  note(`${name} started (pid ${w.pid})`);
  return w;
}

// Picks a live, running worker holding a chunk with rows pending, preferring
// one in the middle of a chunk (some of its rows committed, a few left) whose chunks were
// never reclaimed (their rows have no crash marks to add up); resolves with
// { entry, chunks }.
async function pickHolder(uri, batchId, exclude) {
  const live = () => workers.filter((e) => !e.killedAt && !e.stoppedAt && !exclude.includes(e));
  const pick = (held, strict) => {
    for (const e of live()) {
      const mine = held.filter((c) => c.pid === e.w.pid);
      if (mine.length === 0) continue;
      if (strict && !mine.some((c) => c.pending < CHUNK_ROWS && c.pending >= 4)) continue;
      if (strict && mine.some((c) => c.reclaims > 0)) continue;
      return { entry: e, chunks: mine };
    }
    return null;
  };
  let held = [];
  try {
    held = await waitFor('a worker in the middle of a chunk', () => heldChunks(uri, batchId),
      (x) => pick(x, true) !== null, 8000, 50);
    return pick(held, true);
  } catch {
    held = await waitFor('a worker holding a chunk', () => heldChunks(uri, batchId), (x) => pick(x, false) !== null,
      10000, 50);
    return pick(held, false);
  }
}

// On a failure, the processes' last words.
function tails() {
  const tail = (s) => s.split('\n').slice(-15).join('\n');
  const parts = [`timeline:\n${timeline.join('\n')}`];
  if (api) parts.push(`api node stderr:\n${tail(api.stderr())}`);
  for (const e of workers) parts.push(`${e.name} (pid ${e.w.pid}) stderr:\n${tail(e.w.stderr())}`);
  return parts.join('\n');
}

test('3 workers on PostgreSQL: kill -9, SIGSTOP past the lease and a database restart; each request answered once',
  { timeout: DEADLINE_MS + 60000 }, async (t) => {
    try {
      await scenario(t);
    } catch (e) {
      console.log(tails());
      throw e;
    }
  });

async function scenario(t) {
  work = await h.makeWorkDir('kvbatch-scaleout-');
  pgDir = fs.mkdtempSync('/tmp/kvb-so-pg-');
  const uri = await h.pgStart(pgDir, process.pid);
  note(`PostgreSQL at ${uri}`);

  api = await h.startServer({ dataDir: path.join(work.dir, 'api'), extraArgs: ['--store', uri, ...NODE_ARGS] });
  assert.match(api.stdout(), /no model: batches run on workers/);
  for (let i = 1; i <= 3; i++) await addWorker(uri, `worker${i}`);
  const client = api.client();

  // A node without a model answers online requests with a clear 503.
  await assert.rejects(
    client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 }),
    (e) => {
      assert.equal(e.status, 503);
      assert.match(e.message, /no model/i);
      assert.match(e.message, /-m/);
      return true;
    });

  const input = rows();
  const file = await h.uploadFile(client, h.makeInputFile(work.dir, 'scaleout.jsonl', input));
  const created = await client.batches.create({
    input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h',
  });
  const batchId = created.id;
  const createdAt = Date.now();
  note(`batch ${batchId} created`);
  const deadline = createdAt + DEADLINE_MS;
  const left = () => Math.max(1000, deadline - Date.now());
  const counts = () => client.batches.retrieve(batchId);
  const answered = (b) => b.request_counts.completed + b.request_counts.failed;

  // Validation by any node's keeper: 6 prefix groups of 100 rows, 25 a chunk.
  // (Pending rows and answers in one snapshot: a commit changes both at once.)
  const chunkRows = await waitFor('the chunks', () => h.psql(uri,
    `SELECT count(*), count(DISTINCT prefix_hash), sum(pending) + (SELECT completed + failed FROM batches ` +
    `WHERE id = '${batchId}') FROM chunks WHERE batch_id = '${batchId}'`),
  (r) => Number(r[0][0]) > 0, left());
  assert.deepEqual(chunkRows[0].map(Number), [N / CHUNK_ROWS, PREFIXES, N], 'chunks, prefixes, rows');

  // 1. kill -9 a worker in the middle of a chunk; a replacement starts at once.
  let b = await waitFor('50 answers', counts, (x) => answered(x) >= 50, left());
  note(`${answered(b)} answered`);
  const victim = await pickHolder(uri, batchId, []);
  process.kill(victim.entry.w.pid, 'SIGKILL');
  const killedAt = Date.now();
  victim.entry.killedAt = killedAt;
  const killedBefore = new Map(victim.chunks.map((c) => [c.chunk, c]));
  note(`kill -9 ${victim.entry.name} holding chunk(s) ${victim.chunks.map((c) => `${c.chunk} (token ${c.token}, ` +
    `${CHUNK_ROWS - c.pending} of ${CHUNK_ROWS} rows committed)`).join(', ')}`);
  assert.equal((await victim.entry.w.exited).signal, 'SIGKILL');
  await addWorker(uri, 'worker4');
  // Its chunks are claimed again (a fresh token) once its lease runs out.
  const reclaimed = waitFor('the killed worker\'s chunks claimed again',
    () => chunkStates(uri, batchId, [...killedBefore.keys()]),
    (m) => [...m].every(([chunk, s]) => s.pending === 0 || s.token !== killedBefore.get(chunk).token), left(), 50)
    .then((m) => {
      const ms = Date.now() - killedAt;
      note(`killed worker's chunks claimed again after ${(ms / 1000).toFixed(2)} s: ${[...m].map(([chunk, s]) =>
        `chunk ${chunk} -> ${s.token !== killedBefore.get(chunk).token ? `${nameOf(s.pid)} (token ${s.token})`
          : 'answered'}`).join(', ')}`);
      return ms;
    });
  reclaimed.catch(() => {}); // awaited below

  // 2. Meanwhile SIGSTOP another worker past its lease (one holding no
  // reclaimed chunk: its rows' crash marks do not add up): its chunk goes to
  // another worker; resumed, it finds its lease lost and commits nothing
  // more of it.
  b = await waitFor('more answers', counts, (x) => answered(x) >= Math.min(N, answered(b) + 30), left());
  note(`${answered(b)} answered`);
  const paused = await pickHolder(uri, batchId, []);
  process.kill(paused.entry.w.pid, 'SIGSTOP');
  paused.entry.stoppedAt = Date.now();
  const pausedBefore = new Map(paused.chunks.map((c) => [c.chunk, c]));
  note(`SIGSTOP ${paused.entry.name} holding chunk(s) ${paused.chunks.map((c) => `${c.chunk} (token ${c.token}, ` +
    `${c.pending} rows pending)`).join(', ')}`);
  const taken = await waitFor('the paused worker\'s chunk claimed by another worker',
    () => chunkStates(uri, batchId, [...pausedBefore.keys()]),
    (m) => [...m].some(([chunk, s]) => s.token !== pausedBefore.get(chunk).token), left(), 100);
  const takenOver = [...taken].filter(([chunk, s]) => s.token !== pausedBefore.get(chunk).token);
  const takeoverMs = Date.now() - paused.entry.stoppedAt;
  note(`paused ${(takeoverMs / 1000).toFixed(2)} s: chunk(s) ` +
    `${takenOver.map(([c, s]) => `${c} taken by ${nameOf(s.pid)} (token ${s.token})`).join(', ')}; SIGCONT`);
  process.kill(paused.entry.w.pid, 'SIGCONT');
  paused.entry.stoppedAt = null;
  paused.entry.wasPaused = true;
  await waitFor('the resumed worker to find its lease lost', async () => paused.entry.w.stderr(),
    (s) => /lease lost/.test(s), left());
  const lostLines = paused.entry.w.stderr().split('\n').filter((l) => /lease lost/.test(l));
  note(`${paused.entry.name}: ${lostLines[0]}`);
  // Refused by the fence: its token for a chunk now claimed under another.
  const stale = takenOver.map(([c]) => [c, pausedBefore.get(c).token]);
  assert.ok(lostLines.some((l) => stale.some(([c, tok]) => l.includes(`chunk ${c} of batch ${batchId}`) &&
    l.includes(`token ${tok} no longer holds`))), lostLines.join('\n'));
  const reclaimMs = await reclaimed;
  assert.ok(reclaimMs >= LEASE_S * 1000 - 500, `not before the lease ran out (${reclaimMs} ms)`);

  // 3. Restart PostgreSQL under the running batch (same directory, same URI).
  b = await waitFor('more answers', counts, (x) => answered(x) >= Math.min(N, answered(b) + 30), left());
  note(`${answered(b)} answered`);
  let restartMs = null;
  if (answered(b) < N) {
    const s0 = Date.now();
    await h.pgStop(pgDir);
    note('PostgreSQL stopped');
    const again = await h.pgStart(pgDir, process.pid);
    restartMs = Date.now() - s0;
    assert.equal(again, uri, 'same URI after a restart');
    note(`PostgreSQL restarted (down ${(restartMs / 1000).toFixed(2)} s)`);
  } else {
    t.diagnostic('the batch finished before the database restart');
  }
  const afterRestart = await waitFor('an answer after the restart', counts, (x) => answered(x) > answered(b) ||
    answered(x) === N, left(), 200);
  note(`${answered(afterRestart)} answered after the restart`);

  // Done.
  const done = await waitFor('the batch to finish', counts,
    (x) => ['completed', 'failed', 'cancelled', 'expired'].includes(x.status), left(), 200);
  const doneAt = Date.now();
  note(`batch ${done.status}: ${JSON.stringify(done.request_counts)}`);
  assert.equal(done.status, 'completed', JSON.stringify(done.errors));

  // Every worker still running stops and reports.
  const stats = new Map();
  for (const e of workers) {
    if (e.killedAt) continue;
    e.stoppedAt = Date.now();
    const r = await h.stopServer(e.w, 10000);
    assert.equal(r.code, 0, `${e.name} exit: ${JSON.stringify(r)}\n${e.w.stderr()}`);
    const s = h.workerStats(e.w.stderr());
    assert.ok(s, `${e.name} printed its stats line:\n${e.w.stderr()}`);
    stats.set(e.name, s);
  }

  // Each request answered exactly once.
  assert.equal(done.request_counts.total, N);
  assert.equal(done.request_counts.completed + done.request_counts.failed, N, 'no row counted twice');
  const { output, errors } = await h.batchResults(client, done);
  h.assertCoverage(assert, input.map((r) => r.custom_id), [...output, ...errors]);
  assert.equal(output.length, done.request_counts.completed);
  assert.equal(errors.length, done.request_counts.failed);
  for (const l of errors) assert.equal(l.error?.code ?? l.response?.body?.error?.code, 'request_crashed_engine',
    JSON.stringify(l));
  // A row's crash count goes up when its chunk is claimed again while the row
  // is marked in flight (started in the lost holder's engine and not committed
  // by it): each such run was lost and the row ran again.
  const stored = await h.psql(uri, `SELECT count(*) FILTER (WHERE state <> 0), count(*) FILTER (WHERE crashes > 0), ` +
    `coalesce(sum(crashes), 0) FROM requests WHERE batch_id = '${batchId}'`);
  assert.equal(Number(stored[0][0]), N, 'every row answered in the store');
  const [rerunRows, rerunRuns] = [Number(stored[0][1]), Number(stored[0][2])];

  // Usage: each answer counted once.
  let prompt = 0, completion = 0, cached = 0;
  for (const l of output) {
    assert.equal(l.response.status_code, 200);
    const u = l.response.body.usage;
    prompt += u.prompt_tokens;
    completion += u.completion_tokens;
    cached += u.prompt_tokens_details?.cached_tokens ?? 0;
  }
  assert.equal(done.usage.input_tokens, prompt, 'input tokens');
  assert.equal(done.usage.output_tokens, completion, 'output tokens');
  assert.equal(done.usage.input_tokens_details.cached_tokens, cached, 'cached tokens');

  // The paused worker lost its chunk and committed none of it afterwards;
  // the workers' commits add up to the batch (the killed one's by difference).
  const ps = stats.get(paused.entry.name);
  assert.ok(ps.lost >= 1, `${paused.entry.name}: ${JSON.stringify(ps)}`);
  let committed = 0;
  for (const s of stats.values()) committed += s.committed;
  assert.ok(committed <= N, `survivors committed ${committed} > ${N}`);
  const killedCommitted = N - committed;

  // ---- Report ----
  const wall = (doneAt - createdAt) / 1000;
  const dropped = [...stats.values()].reduce((a, s) => a + s.dropped, 0);
  const report = [
    `reclaim time after kill -9: ${(reclaimMs / 1000).toFixed(2)} s (lease ${LEASE_S} s); after SIGSTOP: ` +
      `${(takeoverMs / 1000).toFixed(2)} s`,
    `PostgreSQL restart: ${restartMs === null ? 'skipped' : `${(restartMs / 1000).toFixed(2)} s down`}`,
    `requests recomputed: ${rerunRuns} lost runs of ${rerunRows} rows (started by a worker that lost the chunk, ` +
      `not committed by it, run again: in flight or answered but uncommitted); of them ${dropped} answers dropped ` +
      `by the resumed worker on finding its lease lost; failed: ${done.request_counts.failed}`,
    `total: ${N} requests in ${wall.toFixed(1)} s = ${(N / wall).toFixed(1)} req/s over ${workers.length} workers ` +
      `(usage: ${prompt} prompt tokens, ${cached} cached, ${completion} completion)`,
  ];
  for (const e of workers) {
    const from = Math.max(e.w.startedAt, createdAt);
    const until = e.killedAt ?? Math.min(doneAt, e.stoppedAt);
    const secs = Math.max(0.001, (until - from) / 1000);
    const s = stats.get(e.name);
    if (s) {
      report.push(`${e.name}: ${s.committed} committed in ${secs.toFixed(1)} s = ${(s.committed / secs).toFixed(1)} ` +
        `req/s; ${s.claimed} chunks claimed, ${s.prefixGroups} prefix groups (of ${PREFIXES} prefixes); ` +
        `${s.lost} chunks lost, ${s.dropped} results dropped${e.wasPaused ? ' (paused with SIGSTOP)' : ''}`);
    } else {
      report.push(`${e.name}: killed with SIGKILL after ${secs.toFixed(1)} s, no stats line; ${killedCommitted} ` +
        `committed (the rest of the ${N}) = ${(killedCommitted / secs).toFixed(1)} req/s`);
    }
  }
  const groups = [...stats.entries()].map(([name, st]) => `${name} ${st.prefixGroups}`);
  report.push(`prefix groups claimed: ${groups.join(', ')} (sum ${[...stats.values()].reduce((a, st) => a +
    st.prefixGroups, 0)}, the killed worker's unknown) for ${PREFIXES} distinct prefixes in ${N / CHUNK_ROWS} chunks`);
  for (const l of report) t.diagnostic(l);
}
