// The server process's life: kill -9 in the middle of a batch and a restart
// on the same --data-dir finish it with exactly the answers of an
// uninterrupted run; one server per data dir; SIGTERM stops it cleanly.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import * as h from './helpers.mjs';

let work;
const servers = [];
// One sequence and a window of one: every request runs alone, so its text
// does not depend on what ran beside it, and runs are comparable exactly.
// (One engine thread each, the helpers' default: the reference server runs
// beside A and B without oversubscribing the cores.)
const SLOW = { maxSeqs: 1, extraArgs: ['--window', '1'] };

before(async () => {
  work = await h.makeWorkDir('kvbatch-resume-');
});

after(async () => {
  await Promise.all(servers.map((s) => h.stopServer(s)));
  h.removeDir(work && work.dir);
});

async function start(dataDir, opts = SLOW) {
  const s = await h.startServer({ model: work.model, dataDir, ...opts });
  servers.push(s);
  return s;
}

// Runs `kvbatch serve` expecting it to exit by itself; returns { code, signal, stderr }.
function serveToExit(args, timeoutMs = 20000) {
  return new Promise((resolve, reject) => {
    const p = spawn(h.KVBATCH_BIN, ['serve', ...args], { env: h.childEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    let out = '';
    p.stderr.on('data', (d) => { err += d; });
    p.stdout.on('data', (d) => { out += d; });
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`serve did not exit in ${timeoutMs} ms; stdout: ${out}`));
    }, timeoutMs);
    p.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr: err, stdout: out });
    });
  });
}

test('kill -9 in the middle of a batch: a restart finishes it, each request once, same texts', async () => {
  const N = 40;
  const rows = h.chatRows(N, { prefix: 'resume-', body: { max_tokens: 64 } });
  const input = h.makeInputFile(work.dir, 'resume.jsonl', rows);
  const dataDir = path.join(work.dir, 'data');

  // The reference: an uninterrupted run on a server of its own with the same
  // flags, going on meanwhile. (Not `kvbatch run --max-seqs 1`: it keeps
  // several requests in flight, and with random weights the next-token
  // distribution is so flat that float noise from other batch shapes flips
  // tokens.)
  const refServer = await start(path.join(work.dir, 'reference'));
  const cr = refServer.client();
  const reference = (async () => {
    const rf = await h.uploadFile(cr, input);
    const rb = await cr.batches.create({ input_file_id: rf.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
    const rd = await h.waitForBatch(cr, rb.id, ['completed', 'failed'], 55000, { intervalMs: 200 });
    assert.equal(rd.status, 'completed');
    const { output } = await h.batchResults(cr, rd);
    return output;
  })();
  reference.catch(() => {}); // awaited below

  const a = await start(dataDir);
  const ca = a.client();
  const f = await h.uploadFile(ca, input);
  const created = await ca.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  const mid = await h.waitForBatch(ca, created.id, [], 40000,
    { intervalMs: 50, until: (b) => b.request_counts.completed >= 10 });
  const killedAt = mid.request_counts.completed;
  process.kill(a.pid, 'SIGKILL');
  const ex = await a.exited;
  assert.equal(ex.signal, 'SIGKILL');
  assert.equal(mid.status, 'in_progress', 'the batch was still running when the server was killed');
  assert.ok(killedAt < N, `killed after ${killedAt} of ${N}: too late to test a resume`);

  // Server B takes over the data dir (A's lock died with it).
  const b = await start(dataDir);
  const cb = b.client();
  const first = await cb.batches.retrieve(created.id);
  assert.ok(['in_progress', 'completed'].includes(first.status), first.status);
  assert.ok(first.request_counts.completed >= killedAt,
    `committed answers survive the kill (${first.request_counts.completed} < ${killedAt})`);

  // Meanwhile a second server on the same data dir is refused.
  const second = await serveToExit(['-m', work.model, '--port', '0', '--data-dir', dataDir, '--max-seqs', '1']);
  assert.equal(second.code, 1, `second server: ${JSON.stringify(second)}`);
  assert.match(second.stderr, /another kvbatch serve/);

  const done = await h.waitForBatch(cb, created.id, ['completed', 'failed', 'cancelled', 'expired'], 50000);
  assert.equal(done.status, 'completed');
  assert.deepEqual(done.request_counts, { total: N, completed: N, failed: 0 });
  assert.equal(done.error_file_id, null);
  assert.equal(done.kvbatch.progress, 1);
  const { output, errors } = await h.batchResults(cb, done);
  assert.equal(errors.length, 0);
  h.assertCoverage(assert, rows.map((r) => r.custom_id), output);
  assert.deepEqual(output.map((l) => l.custom_id), rows.map((r) => r.custom_id), 'output in input order');
  assert.equal(new Set(output.map((l) => l.id)).size, N, 'line ids are unique');

  // Usage counts each request once: nothing committed was counted again.
  let promptTokens = 0, completionTokens = 0;
  for (const l of output) {
    assert.equal(l.response.status_code, 200);
    promptTokens += l.response.body.usage.prompt_tokens;
    completionTokens += l.response.body.usage.completion_tokens;
  }
  assert.equal(done.usage.input_tokens, promptTokens);
  assert.equal(done.usage.output_tokens, completionTokens);

  const ref = new Map((await reference).map((l) => [l.custom_id, l]));
  let same = 0;
  const diffs = [];
  for (const l of output) {
    const r = ref.get(l.custom_id);
    assert.ok(r, `reference has ${l.custom_id}`);
    if (h.contentOf(r) === h.contentOf(l)) same++;
    else diffs.push(`${l.custom_id}: ${JSON.stringify(h.contentOf(l))} vs ${JSON.stringify(h.contentOf(r))}`);
    assert.equal(l.response.body.usage.completion_tokens, r.response.body.usage.completion_tokens);
  }
  console.log(`# killed after ${killedAt}/${N} committed; ${same}/${N} identical to the uninterrupted run`);
  assert.equal(same, N, `differences:\n${diffs.join('\n')}`);
});

test('a second server on a running server\'s data dir fails to start', async () => {
  const dataDir = path.join(work.dir, 'locked');
  const s = await start(dataDir, { maxSeqs: 2 });
  const r = await serveToExit(['-m', work.model, '--port', '0', '--data-dir', dataDir, '--max-seqs', '1']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /another kvbatch serve/);
  assert.doesNotMatch(r.stdout, /listening/);
  // The first one is unaffected.
  const models = await s.client().models.list();
  assert.ok(models.data.some((m) => m.id === 'tiny'));
});

test('SIGTERM stops the server gracefully: exit status 0, and a restart works', async () => {
    const dataDir = path.join(work.dir, 'term');
    const s = await start(dataDir, { maxSeqs: 2 });
    const f = await h.uploadFile(s.client(), h.makeInputFile(work.dir, 'term.jsonl', h.chatRows(4, { body: { max_tokens: 4 } })));
    await h.sleep(300);
    s.proc.kill('SIGTERM');
    const r = await h.withTimeout(s.exited, 10000, { code: 'timeout', signal: null });
    // Restart on the same data dir regardless, so the state is checked too.
    const s2 = await start(dataDir, { maxSeqs: 2 });
    assert.equal((await s2.client().files.retrieve(f.id)).id, f.id);
    assert.deepEqual({ code: r.code, signal: r.signal }, { code: 0, signal: null },
      `exit after SIGTERM; stderr: ${s.stderr()}`);
    assert.match(s.stderr(), /kvbatch serve: stopping/);
  });
