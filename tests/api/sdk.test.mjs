// `kvbatch serve` driven by the official OpenAI Node SDK: Files, Batches
// (lifecycle, results, pagination, cancel, pause/resume, expiry), online
// chat/completions (plain and streaming) and models.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { APIError } from 'openai';
import * as h from './helpers.mjs';

let work; // { dir, model }
let fast; // --max-seqs 4
let slow; // --max-seqs 1 --window 1: batches advance one request at a time
let client;
let slowClient;
const state = {}; // results shared between tests (a finished batch, ...)

before(async () => {
  work = await h.makeWorkDir('kvbatch-sdk-');
  fast = await h.startServer({ model: work.model, dataDir: path.join(work.dir, 'fast') });
  slow = await h.startServer({
    model: work.model, dataDir: path.join(work.dir, 'slow'), maxSeqs: 1, extraArgs: ['--window', '1'],
  });
  client = fast.client();
  slowClient = slow.client();
});

after(async () => {
  // Exit statuses are checked in resume.test.mjs ('SIGTERM stops the server gracefully').
  await Promise.all([h.stopServer(fast), h.stopServer(slow)]);
  h.removeDir(work && work.dir);
});

const BATCH_FIELDS = [
  'id', 'object', 'endpoint', 'errors', 'input_file_id', 'completion_window', 'status', 'output_file_id',
  'error_file_id', 'created_at', 'in_progress_at', 'expires_at', 'finalizing_at', 'completed_at', 'failed_at',
  'expired_at', 'cancelling_at', 'cancelled_at', 'request_counts', 'metadata', 'usage',
];

function assertBatchShape(b) {
  for (const f of BATCH_FIELDS) assert.ok(f in b, `batch object lacks '${f}'`);
  assert.match(b.id, /^batch_/);
  assert.equal(b.object, 'batch');
  assert.equal(typeof b.created_at, 'number');
  assert.equal(typeof b.request_counts.total, 'number');
  assert.equal(typeof b.request_counts.completed, 'number');
  assert.equal(typeof b.request_counts.failed, 'number');
  assert.equal(typeof b.usage.input_tokens, 'number');
  assert.equal(typeof b.usage.output_tokens, 'number');
  assert.equal(typeof b.usage.input_tokens_details.cached_tokens, 'number');
  assert.equal(b.usage.total_tokens, b.usage.input_tokens + b.usage.output_tokens);
  assert.equal(typeof b.kvbatch, 'object');
}

test('files: create, retrieve, list, content', async () => {
  const rows = h.chatRows(3, { prefix: 'files-' });
  const p = h.makeInputFile(work.dir, 'files-test.jsonl', rows);
  const bytes = fs.readFileSync(p);
  const before = Math.floor(Date.now() / 1000);
  const f = await h.uploadFile(client, p);
  assert.match(f.id, /^file-/);
  assert.equal(f.object, 'file');
  assert.equal(f.bytes, bytes.length);
  assert.equal(f.filename, 'files-test.jsonl');
  assert.equal(f.purpose, 'batch');
  assert.equal(typeof f.created_at, 'number');
  assert.ok(f.created_at >= before - 1 && f.created_at <= Math.floor(Date.now() / 1000) + 1);

  const r = await client.files.retrieve(f.id);
  assert.deepEqual(r, f);

  const ids = [];
  for await (const x of client.files.list()) ids.push(x.id);
  assert.ok(ids.includes(f.id), 'files.list contains the upload');
  const onlyBatch = await client.files.list({ purpose: 'batch' });
  assert.ok(onlyBatch.data.every((x) => x.purpose === 'batch'));

  const content = Buffer.from(await (await client.files.content(f.id)).arrayBuffer());
  assert.ok(content.equals(bytes), 'content equals the uploaded bytes');

  // toFile works as well, and keeps the name given.
  const { toFile } = await import('openai');
  const g = await client.files.create({ file: await toFile(bytes, 'via-tofile.jsonl'), purpose: 'batch' });
  assert.equal(g.filename, 'via-tofile.jsonl');
  assert.equal(g.bytes, bytes.length);
});

test('chat batch: lifecycle, usage, output and error files, same answers as kvbatch run', async () => {
  const N = 27;
  const badAt = new Set([3, 11, 19]); // temperature out of range: passes line validation, fails at run time
  const rows = [];
  for (let i = 0; i < N; i++) {
    rows.push(h.chatLine(`chat-${i}`, `Question ${i}: when does shipment ${1000 + i} arrive in Lisbon?`,
      badAt.has(i) ? { temperature: 5 } : {}));
  }
  const input = h.makeInputFile(work.dir, 'chat-batch.jsonl', rows);
  const f = await h.uploadFile(client, input);

  const created = await client.batches.create({
    input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h',
    metadata: { suite: 'sdk', run: '1' },
  });
  assertBatchShape(created);
  assert.equal(created.status, 'validating');
  assert.equal(created.endpoint, '/v1/chat/completions');
  assert.equal(created.input_file_id, f.id);
  assert.equal(created.completion_window, '24h');
  assert.deepEqual(created.metadata, { suite: 'sdk', run: '1' });
  assert.equal(created.expires_at, created.created_at + 86400);
  for (const k of ['in_progress_at', 'finalizing_at', 'completed_at', 'failed_at', 'expired_at', 'cancelling_at',
    'cancelled_at', 'output_file_id', 'error_file_id', 'errors'])
    assert.equal(created[k], null, `${k} is null on creation`);

  const b = await h.waitForBatch(client, created.id, ['completed', 'failed', 'expired', 'cancelled']);
  assertBatchShape(b);
  assert.equal(b.status, 'completed', JSON.stringify(b.errors));
  assert.equal(b.errors, null);
  for (const k of ['in_progress_at', 'finalizing_at', 'completed_at'])
    assert.equal(typeof b[k], 'number', `${k} set`);
  assert.ok(b.created_at <= b.in_progress_at && b.in_progress_at <= b.finalizing_at &&
    b.finalizing_at <= b.completed_at, 'timestamps in order');
  for (const k of ['failed_at', 'expired_at', 'cancelling_at', 'cancelled_at']) assert.equal(b[k], null);
  assert.deepEqual(b.request_counts, { total: N, completed: N - badAt.size, failed: badAt.size });
  assert.ok(b.usage.input_tokens > 0);
  assert.ok(b.usage.output_tokens > 0);
  assert.ok(b.usage.input_tokens_details.cached_tokens > 0, 'the shared system prompt is served from the cache');
  assert.ok(b.usage.input_tokens_details.cached_tokens < b.usage.input_tokens);
  assert.equal(b.kvbatch.progress, 1);
  assert.ok(b.kvbatch.prefix_cache_hit_rate > 0);
  assert.deepEqual(b.metadata, { suite: 'sdk', run: '1' });
  assert.match(b.output_file_id, /^file-/);
  assert.match(b.error_file_id, /^file-/);

  const outFile = await client.files.retrieve(b.output_file_id);
  assert.equal(outFile.purpose, 'batch_output');
  const { output, errors } = await h.batchResults(client, b);
  h.assertCoverage(assert, rows.map((r) => r.custom_id), [...output, ...errors]);
  assert.equal(output.length, N - badAt.size);
  assert.equal(errors.length, badAt.size);
  assert.deepEqual(output.map((l) => l.custom_id),
    rows.filter((_, i) => !badAt.has(i)).map((r) => r.custom_id), 'output lines in input order');
  assert.deepEqual(errors.map((l) => l.custom_id), [...badAt].map((i) => `chat-${i}`), 'error lines in input order');

  let sumIn = 0, sumOut = 0, sumCached = 0;
  for (const l of output) {
    assert.match(l.id, /^batch_req_/);
    assert.equal(l.error, null);
    assert.equal(l.response.status_code, 200);
    assert.equal(typeof l.response.request_id, 'string');
    assert.ok(l.response.request_id.length > 0);
    const body = l.response.body;
    assert.equal(body.object, 'chat.completion');
    assert.match(body.id, /^chatcmpl-/);
    assert.equal(body.model, 'tiny');
    assert.equal(body.choices.length, 1);
    assert.equal(body.choices[0].index, 0);
    assert.equal(body.choices[0].message.role, 'assistant');
    assert.equal(typeof body.choices[0].message.content, 'string');
    assert.ok(['length', 'stop'].includes(body.choices[0].finish_reason));
    const u = body.usage;
    assert.ok(u.prompt_tokens > 0);
    assert.ok(u.completion_tokens >= 1 && u.completion_tokens <= 16, `completion_tokens ${u.completion_tokens}`);
    assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
    assert.equal(typeof u.prompt_tokens_details.cached_tokens, 'number');
    sumIn += u.prompt_tokens;
    sumOut += u.completion_tokens;
    sumCached += u.prompt_tokens_details.cached_tokens;
  }
  assert.equal(b.usage.output_tokens, sumOut, 'batch usage = sum of the responses');
  assert.equal(b.usage.input_tokens_details.cached_tokens, sumCached);
  assert.ok(b.usage.input_tokens >= sumIn);
  for (const l of errors) {
    assert.match(l.id, /^batch_req_/);
    assert.equal(l.error, null);
    assert.equal(l.response.status_code, 400);
    const e = l.response.body.error;
    assert.equal(typeof e.message, 'string');
    assert.match(e.message, /temperature/);
    assert.equal(e.type, 'invalid_request_error');
  }
  state.chatBatch = b;
  state.chatRows = rows;

  // The same input through `kvbatch run` (same sequences) gives the same texts.
  const runOut = await h.kvbatchRun(work.model, input, path.join(work.dir, 'chat-run.jsonl'),
    ['--max-seqs', '4', '--default-max-tokens', '16', '--threads', '1']);
  const runBy = new Map(runOut.map((l) => [l.custom_id, l]));
  let same = 0;
  for (const l of output) {
    const r = runBy.get(l.custom_id);
    assert.ok(r, `kvbatch run answered ${l.custom_id}`);
    if (h.contentOf(r) === h.contentOf(l)) same++;
  }
  for (const l of errors) assert.equal(runBy.get(l.custom_id).response.status_code, 400);
  const rate = same / output.length;
  console.log(`# serve vs kvbatch run: ${same}/${output.length} identical (${(rate * 100).toFixed(1)}%)`);
  assert.ok(rate >= 0.9, `only ${same}/${output.length} identical`);
});

test('completions batch: text_completion bodies', async () => {
  const rows = [];
  for (let i = 0; i < 12; i++) {
    rows.push({
      custom_id: `cmpl-${i}`, method: 'POST', url: '/v1/completions',
      body: { model: 'tiny', prompt: `${h.SYSTEM_PROMPT}\nItem ${i}:`, max_tokens: 8 },
    });
  }
  const f = await h.uploadFile(client, h.makeInputFile(work.dir, 'cmpl-batch.jsonl', rows));
  const created = await client.batches.create({
    input_file_id: f.id, endpoint: '/v1/completions', completion_window: '24h',
  });
  assert.equal(created.endpoint, '/v1/completions');
  assert.equal(created.metadata, null);
  const b = await h.waitForBatch(client, created.id, ['completed', 'failed']);
  assert.equal(b.status, 'completed', JSON.stringify(b.errors));
  assert.deepEqual(b.request_counts, { total: 12, completed: 12, failed: 0 });
  assert.equal(b.error_file_id, null, 'no error file when nothing failed');
  const { output } = await h.batchResults(client, b);
  assert.deepEqual(output.map((l) => l.custom_id), rows.map((r) => r.custom_id));
  for (const l of output) {
    assert.equal(l.response.status_code, 200);
    const body = l.response.body;
    assert.equal(body.object, 'text_completion');
    assert.match(body.id, /^cmpl-/);
    assert.equal(typeof body.choices[0].text, 'string');
    assert.ok(body.choices[0].text.length > 0);
    assert.ok(body.usage.completion_tokens >= 1 && body.usage.completion_tokens <= 8);
  }
});

test('batches.list: pagination newest first, auto-pagination yields each batch once', async () => {
  const f = await h.uploadFile(client, h.makeInputFile(work.dir, 'page.jsonl', h.chatRows(2, { prefix: 'page-', body: { max_tokens: 2 } })));
  const mine = [];
  for (let i = 0; i < 3; i++) {
    const b = await client.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
    mine.push(b.id);
  }
  const all = await client.batches.list({ limit: 100 });
  assert.equal(all.has_more, false);
  const allIds = all.data.map((b) => b.id);
  assert.ok(allIds.length >= 5);
  for (const id of mine) assert.ok(allIds.includes(id));
  for (let i = 1; i < all.data.length; i++) assert.ok(all.data[i - 1].created_at >= all.data[i].created_at);

  const page1 = await client.batches.list({ limit: 2 });
  assert.equal(page1.data.length, 2);
  assert.equal(page1.has_more, true);
  assert.ok(page1.hasNextPage());
  assert.deepEqual(page1.data.map((b) => b.id), [mine[2], mine[1]], 'newest first');
  const page2 = await page1.getNextPage();
  assert.equal(page2.data[0].id, mine[0]);
  const paged = [...page1.data, ...page2.data].map((b) => b.id);
  let p = page2;
  while (p.hasNextPage()) {
    p = await p.getNextPage();
    paged.push(...p.data.map((b) => b.id));
  }
  assert.deepEqual(paged, allIds);

  const auto = [];
  for await (const b of client.batches.list({ limit: 2 })) auto.push(b.id);
  assert.deepEqual(auto, allIds, 'every batch exactly once, in order');
  assert.equal(new Set(auto).size, auto.length);
  for (const id of mine) await h.waitForBatch(client, id, ['completed']);
});

test('chat.completions.create: plain, deterministic with a seed', async () => {
  const req = {
    model: 'tiny', max_tokens: 5, seed: 1234,
    messages: [{ role: 'system', content: h.SYSTEM_PROMPT }, { role: 'user', content: 'Where is my parcel?' }],
  };
  const r = await client.chat.completions.create(req);
  assert.equal(r.object, 'chat.completion');
  assert.match(r.id, /^chatcmpl-/);
  assert.equal(r.model, 'tiny');
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.equal(typeof r.choices[0].message.content, 'string');
  assert.ok(r.choices[0].message.content.length > 0);
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 5);
  assert.ok(r.usage.prompt_tokens > 0);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + 5);
  const again = await client.chat.completions.create(req);
  assert.equal(again.choices[0].message.content, r.choices[0].message.content);
  state.chatReq = req;
  state.chatContent = r.choices[0].message.content;
});

test('chat.completions.create online: json_schema, logprobs and n choices', async () => {
  const schema = {
    type: 'object',
    properties: {
      score: { type: 'integer', minimum: 0, maximum: 100 },
      verdict: { type: 'string', enum: ['hire', 'maybe', 'reject'] },
    },
    required: ['score', 'verdict'],
    additionalProperties: false,
  };
  const r = await client.chat.completions.create({
    model: 'tiny', max_tokens: 40, seed: 7, n: 2, temperature: 1, logprobs: true, top_logprobs: 3,
    response_format: { type: 'json_schema', json_schema: { name: 'score', schema, strict: true } },
    messages: [{ role: 'system', content: h.SYSTEM_PROMPT }, { role: 'user', content: 'Score this candidate.' }],
  });
  assert.equal(r.choices.length, 2);
  assert.deepEqual(r.choices.map((c) => c.index), [0, 1]);
  for (const c of r.choices) {
    const tokens = c.logprobs.content;
    assert.ok(tokens.length > 0);
    for (const t of tokens) {
      assert.equal(typeof t.token, 'string');
      assert.ok(t.logprob <= 0);
      assert.equal(t.top_logprobs.length, 3);
    }
    if (c.finish_reason === 'stop') {
      const v = JSON.parse(c.message.content);
      assert.ok(Number.isInteger(v.score) && v.score >= 0 && v.score <= 100, c.message.content);
      assert.ok(['hire', 'maybe', 'reject'].includes(v.verdict), c.message.content);
    } else {
      assert.equal(c.finish_reason, 'length');
    }
  }
  // A schema the converter cannot take is a 400, not a crash.
  await assert.rejects(
    client.chat.completions.create({
      model: 'tiny', max_tokens: 5,
      response_format: { type: 'json_schema', json_schema: { name: 'bad', schema: { type: 'object', properties: 5 } } },
      messages: [{ role: 'user', content: 'x' }],
    }),
    (e) => e.status === 400,
  );
});

test('chat.completions.create stream: deltas add up to the plain answer, usage chunk', async () => {
  const req = { ...state.chatReq, max_tokens: 12 };
  const plain = await client.chat.completions.create(req);
  const stream = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  assert.ok(chunks.length >= 3);
  for (const c of chunks) {
    assert.equal(c.object, 'chat.completion.chunk');
    assert.equal(c.id, chunks[0].id);
  }
  const withChoice = chunks.filter((c) => c.choices.length > 0);
  assert.equal(withChoice[0].choices[0].delta.role, 'assistant');
  const text = withChoice.map((c) => c.choices[0].delta.content ?? '').join('');
  assert.equal(text, plain.choices[0].message.content);
  const last = withChoice[withChoice.length - 1];
  assert.equal(last.choices[0].finish_reason, 'length');
  for (const c of withChoice.slice(0, -1)) assert.equal(c.choices[0].finish_reason, null);
  const usage = chunks[chunks.length - 1];
  assert.deepEqual(usage.choices, []);
  assert.equal(usage.usage.completion_tokens, 12);
  assert.equal(usage.usage.prompt_tokens, plain.usage.prompt_tokens);
});

test('completions.create: plain and streaming agree', async () => {
  const req = { model: 'tiny', prompt: 'Once upon a time in a warehouse', max_tokens: 10, seed: 7 };
  const plain = await client.completions.create(req);
  assert.equal(plain.object, 'text_completion');
  assert.equal(typeof plain.choices[0].text, 'string');
  assert.ok(plain.choices[0].text.length > 0);
  assert.equal(plain.choices[0].finish_reason, 'length');
  assert.equal(plain.usage.completion_tokens, 10);
  const stream = await client.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  const withChoice = chunks.filter((c) => c.choices.length > 0);
  assert.equal(withChoice.map((c) => c.choices[0].text).join(''), plain.choices[0].text);
  assert.equal(withChoice[withChoice.length - 1].choices[0].finish_reason, 'length');
  assert.equal(chunks[chunks.length - 1].usage.completion_tokens, 10);
});

test('models.list and models.retrieve', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes('tiny'), `models: ${ids}`);
  const m = await client.models.retrieve('tiny');
  assert.equal(m.id, 'tiny');
  assert.equal(m.object, 'model');
  await assert.rejects(client.models.retrieve('gpt-nope'), (e) => e instanceof APIError && e.status === 404);
});

test('batches.cancel: unfinished requests go to the error file as batch_cancelled', async () => {
  const N = 60;
  const rows = h.chatRows(N, { prefix: 'cancel-', body: { max_tokens: 64 } });
  const f = await h.uploadFile(slowClient, h.makeInputFile(work.dir, 'cancel.jsonl', rows));
  const created = await slowClient.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  await h.waitForBatch(slowClient, created.id, ['in_progress'], 30000, { intervalMs: 50 });
  const c = await slowClient.batches.cancel(created.id);
  assert.ok(['cancelling', 'cancelled'].includes(c.status), c.status);
  assert.equal(typeof c.cancelling_at, 'number');
  const b = await h.waitForBatch(slowClient, created.id, ['cancelled', 'completed', 'failed'], 30000);
  assert.equal(b.status, 'cancelled');
  assert.equal(typeof b.cancelled_at, 'number');
  assert.equal(typeof b.cancelling_at, 'number');
  assert.ok(b.cancelling_at <= b.cancelled_at);
  assert.equal(b.completed_at, null);
  assert.equal(b.request_counts.total, N);
  assert.equal(b.request_counts.completed + b.request_counts.failed, N);
  assert.ok(b.request_counts.completed < N / 2, `completed ${b.request_counts.completed} of ${N}`);
  const { output, errors } = await h.batchResults(slowClient, b);
  h.assertCoverage(assert, rows.map((r) => r.custom_id), [...output, ...errors]);
  assert.equal(output.length, b.request_counts.completed);
  assert.equal(errors.length, b.request_counts.failed);
  for (const l of output) assert.equal(l.response.status_code, 200);
  for (const l of errors) {
    assert.equal(l.response, null);
    assert.equal(l.error.code, 'batch_cancelled');
    assert.equal(typeof l.error.message, 'string');
  }
  // Cancelling again is idempotent; cancelling a completed batch is a conflict.
  assert.equal((await slowClient.batches.cancel(created.id)).status, 'cancelled');
  await assert.rejects(client.batches.cancel(state.chatBatch.id), (e) => {
    assert.ok(e instanceof APIError);
    assert.equal(e.status, 409);
    assert.equal(typeof e.error.message, 'string');
    return true;
  });
});

test('pause and resume (extensions): a paused batch does not advance', async () => {
  const N = 12;
  const rows = h.chatRows(N, { prefix: 'pause-', body: { max_tokens: 48 } });
  const f = await h.uploadFile(slowClient, h.makeInputFile(work.dir, 'pause.jsonl', rows));
  const created = await slowClient.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  await h.waitForBatch(slowClient, created.id, [], 30000, { intervalMs: 50, until: (b) => b.request_counts.completed >= 1 });
  const paused = await slowClient.post(`/batches/${created.id}/pause`, { body: {} });
  assert.equal(paused.id, created.id);
  assert.equal(paused.kvbatch.paused, true);
  // Let what was already in the engine finish and be committed.
  const settled = await h.waitForBatch(slowClient, created.id, [], 20000,
    { until: (b) => b.kvbatch.in_flight === 0 && b.request_counts.completed >= 1 });
  await h.sleep(300);
  const c1 = (await slowClient.batches.retrieve(created.id));
  await h.sleep(1200);
  const c2 = await slowClient.batches.retrieve(created.id);
  assert.equal(c2.status, 'in_progress');
  assert.equal(c2.kvbatch.paused, true);
  assert.deepEqual(c2.request_counts, c1.request_counts, 'no progress while paused');
  assert.ok(c2.request_counts.completed < N, `paused batch finished anyway (${JSON.stringify(settled.request_counts)})`);

  const resumed = await slowClient.post(`/batches/${created.id}/resume`, { body: {} });
  assert.equal(resumed.kvbatch.paused, false);
  const b = await h.waitForBatch(slowClient, created.id, ['completed', 'failed', 'cancelled'], 30000);
  assert.equal(b.status, 'completed');
  assert.deepEqual(b.request_counts, { total: N, completed: N, failed: 0 });
  assert.equal(b.kvbatch.paused, false);
  // Pausing a finished batch is a conflict.
  await assert.rejects(slowClient.post(`/batches/${created.id}/pause`, { body: {} }),
    (e) => e instanceof APIError && e.status === 409);
  await assert.rejects(slowClient.post('/batches/batch_nope/pause', { body: {} }),
    (e) => e instanceof APIError && e.status === 404);
});

test('interactive chat is answered while a long batch runs', async () => {
  const N = 100;
  const rows = h.chatRows(N, { prefix: 'busy-', body: { max_tokens: 64 } });
  const f = await h.uploadFile(slowClient, h.makeInputFile(work.dir, 'busy.jsonl', rows));
  const created = await slowClient.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  try {
    await h.waitForBatch(slowClient, created.id, [], 30000, { intervalMs: 50, until: (b) => b.request_counts.completed >= 1 });
    const r = await slowClient.chat.completions.create({
      model: 'tiny', max_tokens: 8, seed: 5, messages: [{ role: 'user', content: 'Quick question: are you there?' }],
    });
    assert.equal(r.usage.completion_tokens, 8);
    assert.ok(r.choices[0].message.content.length > 0);
    const b = await slowClient.batches.retrieve(created.id);
    assert.equal(b.status, 'in_progress', 'the chat answer came before the batch finished');
    assert.ok(b.request_counts.completed < N);
  } finally {
    await slowClient.batches.cancel(created.id);
    await h.waitForBatch(slowClient, created.id, ['cancelled', 'completed'], 30000);
  }
});

test('expiry: a short completion_window expires the batch, unfinished requests are batch_expired', async () => {
  // 400 long answers, one at a time: 80,000 tokens, which the batch cannot
  // finish in 3 s even on a fast idle machine (40 of them did, once, on an
  // AVX-512 machine).
  const N = 400;
  const rows = h.chatRows(N, { prefix: 'exp-', body: { max_tokens: 200 } });
  const f = await h.uploadFile(slowClient, h.makeInputFile(work.dir, 'expire.jsonl', rows));
  const created = await slowClient.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '3s' });
  assert.equal(created.completion_window, '3s');
  assert.equal(created.expires_at, created.created_at + 3);
  const b = await h.waitForBatch(slowClient, created.id, ['expired', 'completed', 'failed', 'cancelled'], 40000);
  assert.equal(b.status, 'expired');
  assert.equal(typeof b.expired_at, 'number');
  assert.ok(b.expired_at >= b.expires_at);
  assert.equal(b.completed_at, null);
  assert.equal(b.request_counts.total, N);
  assert.equal(b.request_counts.completed + b.request_counts.failed, N);
  assert.ok(b.request_counts.completed < N);
  const { output, errors } = await h.batchResults(slowClient, b);
  h.assertCoverage(assert, rows.map((r) => r.custom_id), [...output, ...errors]);
  assert.ok(errors.length > 0);
  for (const l of errors) {
    assert.equal(l.response, null);
    assert.equal(l.error.code, 'batch_expired');
  }
});
