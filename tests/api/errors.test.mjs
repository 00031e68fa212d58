// Bad input to `kvbatch serve`, with raw fetch: status codes and OpenAI error
// bodies {error:{message,type,param,code}}, and the server keeps serving.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { APIError, AuthenticationError } from 'openai';
import * as h from './helpers.mjs';

let work;
let main; // default limits
let small; // --max-file-bytes 2000
let keyed; // --api-key sekret
let client;
const state = {};

before(async () => {
  work = await h.makeWorkDir('kvbatch-errors-');
  [main, small, keyed] = await Promise.all([
    h.startServer({ model: work.model, dataDir: path.join(work.dir, 'main') }),
    h.startServer({ model: work.model, dataDir: path.join(work.dir, 'small'), extraArgs: ['--max-file-bytes', '2000'] }),
    h.startServer({ model: work.model, dataDir: path.join(work.dir, 'keyed'), extraArgs: ['--api-key', 'sekret'] }),
  ]);
  client = main.client();
});

after(async () => {
  await Promise.all([h.stopServer(main), h.stopServer(small), h.stopServer(keyed)]);
  h.removeDir(work && work.dir);
});

const call = (server, method, p, opts) => h.httpCall(server.port, method, p, opts);

// Asserts an OpenAI error response; returns its `error` object.
function assertError(r, status, { param, code, type } = {}) {
  assert.equal(r.status, status, `status ${r.status}: ${r.text}`);
  assert.ok(r.body && typeof r.body.error === 'object', `error body: ${r.text}`);
  const e = r.body.error;
  for (const k of ['message', 'type', 'param', 'code']) assert.ok(k in e, `error lacks '${k}': ${r.text}`);
  assert.equal(typeof e.message, 'string');
  assert.ok(e.message.length > 0);
  assert.equal(typeof e.type, 'string');
  if (param !== undefined) assert.equal(e.param, param, r.text);
  if (code !== undefined) assert.equal(e.code, code, r.text);
  if (type !== undefined) assert.equal(e.type, type, r.text);
  return e;
}

function form(content, { purpose = 'batch', filename = 'in.jsonl' } = {}) {
  const fd = new FormData();
  if (purpose !== null) fd.append('purpose', purpose);
  fd.append('file', new Blob([content]), filename);
  return fd;
}

async function uploadRaw(server, content, opts) {
  return call(server, 'POST', '/v1/files', { body: form(content, opts), headers: opts && opts.headers });
}

async function uploadRows(rows, name = 'in.jsonl') {
  return h.uploadFile(client, h.makeInputFile(work.dir, name, rows));
}

test('malformed JSON bodies are 400 invalid_json', async () => {
  for (const p of ['/v1/batches', '/v1/chat/completions', '/v1/completions']) {
    assertError(await call(main, 'POST', p, { body: '{"input_file_id": ' }), 400,
      { code: 'invalid_json', type: 'invalid_request_error' });
    assertError(await call(main, 'POST', p, { body: '[1, 2, 3]' }), 400, { code: 'invalid_json' });
    assertError(await call(main, 'POST', p, { body: '"just a string"' }), 400, { code: 'invalid_json' });
  }
});

test('unknown ids and routes are 404', async () => {
  const nf = { type: 'not_found_error' };
  assertError(await call(main, 'GET', '/v1/files/file-nope'), 404, nf);
  assertError(await call(main, 'GET', '/v1/files/file-nope/content'), 404, nf);
  assertError(await call(main, 'DELETE', '/v1/files/file-nope'), 404, nf);
  assertError(await call(main, 'GET', '/v1/batches/batch_nope'), 404, nf);
  assertError(await call(main, 'POST', '/v1/batches/batch_nope/cancel', { json: {} }), 404, nf);
  const e = assertError(await call(main, 'POST', '/v1/batches', {
    json: { input_file_id: 'file-nope', endpoint: '/v1/chat/completions', completion_window: '24h' },
  }), 404, { ...nf, param: 'input_file_id' });
  assert.match(e.message, /file-nope/);
  const u = await call(main, 'GET', '/v1/no/such/route');
  assertError(u, 404, { code: 'unknown_url' });
  assert.match(u.headers.get('content-type'), /application\/json/);
  assertError(await call(main, 'POST', '/v1/moderations', { json: { input: 'x' } }), 404, { code: 'unknown_url' });
  // The SDK maps them to NotFoundError.
  await assert.rejects(client.batches.retrieve('batch_nope'), (err) => err instanceof APIError && err.status === 404);
});

test('uploads: wrong purpose, missing fields, not multipart', async () => {
  assertError(await uploadRaw(main, '{}\n', { purpose: 'fine-tune' }), 400, { param: 'purpose' });
  assertError(await uploadRaw(main, '{}\n', { purpose: null }), 400, { param: 'purpose' });
  const fd = new FormData();
  fd.append('purpose', 'batch');
  assertError(await call(main, 'POST', '/v1/files', { body: fd }), 400, { param: 'file' });
  assertError(await call(main, 'POST', '/v1/files', { json: { purpose: 'batch' } }), 400);
  await assert.rejects(
    client.files.create({ file: fs.createReadStream(h.makeInputFile(work.dir, 'ft.jsonl', [{}])), purpose: 'fine-tune' }),
    (err) => err instanceof APIError && err.status === 400);
});

test('upload size limit: over it 413 file_too_large, under it accepted', async () => {
  const big = 'x'.repeat(10 * 1024);
  const e = assertError(await uploadRaw(small, big), 413, { code: 'file_too_large' });
  assert.match(e.message, /2000/);
  const okContent = JSON.stringify(h.chatLine('small-1', 'hi')) + '\n';
  assert.ok(okContent.length < 2000);
  const r = await uploadRaw(small, okContent, { filename: 'ok.jsonl' });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.body.bytes, Buffer.byteLength(okContent));
  // Exactly at the limit is accepted too.
  const exact = await uploadRaw(small, 'y'.repeat(2000));
  assert.equal(exact.status, 200, exact.text);
  // A rejected upload left nothing behind.
  const list = await call(small, 'GET', '/v1/files');
  assert.equal(list.body.data.length, 2);
  assert.equal((await call(small, 'GET', '/health')).status, 200);
});

test('API key: missing or wrong is 401, the right key works, /health is open', async () => {
  const none = assertError(await call(keyed, 'GET', '/v1/models'), 401,
    { code: 'invalid_api_key', type: 'authentication_error' });
  assert.match(none.message, /API key/);
  assertError(await call(keyed, 'GET', '/v1/files', { headers: { Authorization: 'Bearer wrong' } }), 401,
    { code: 'invalid_api_key' });
  assertError(await call(keyed, 'POST', '/v1/chat/completions', { json: { messages: [] } }), 401);
  assert.equal((await call(keyed, 'GET', '/health')).status, 200);
  await assert.rejects(keyed.client('wrong').models.list(), (err) => err instanceof AuthenticationError && err.status === 401);
  const c = keyed.client('sekret');
  const models = await c.models.list();
  assert.ok(models.data.some((m) => m.id === 'tiny'));
  const f = await h.uploadFile(c, h.makeInputFile(work.dir, 'keyed.jsonl', h.chatRows(2, { body: { max_tokens: 2 } })));
  assert.match(f.id, /^file-/);
  const r = await c.chat.completions.create({ model: 'tiny', max_tokens: 3, messages: [{ role: 'user', content: 'hi' }] });
  assert.equal(r.usage.completion_tokens, 3);
});

test('batches.create parameter errors are 400 with the param named', async () => {
  const f = await uploadRows(h.chatRows(2, { prefix: 'ok-', body: { max_tokens: 2 } }), 'ok.jsonl');
  const good = { input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' };
  const cases = [
    [{ ...good, endpoint: '/v1/moderations' }, 'endpoint'],
    [{ ...good, endpoint: undefined }, 'endpoint'],
    [{ ...good, completion_window: '1 day' }, 'completion_window'],
    [{ ...good, completion_window: '0h' }, 'completion_window'],
    [{ ...good, completion_window: 24 }, 'completion_window'],
    [{ ...good, input_file_id: undefined }, 'input_file_id'],
    [{ ...good, input_file_id: 42 }, 'input_file_id'],
    [{ ...good, metadata: 'nope' }, 'metadata'],
    [{ ...good, metadata: { k: 1 } }, 'metadata.k'],
  ];
  for (const [body, param] of cases) {
    assertError(await call(main, 'POST', '/v1/batches', { json: body }), 400,
      { param, type: 'invalid_request_error' });
  }
  const b = await client.batches.create(good);
  const done = await h.waitForBatch(client, b.id, ['completed', 'failed']);
  assert.equal(done.status, 'completed');
  state.finished = done;
  // A batch on an output file (purpose batch_output) is refused.
  const out = await client.files.retrieve(done.output_file_id);
  assert.equal(out.purpose, 'batch_output');
  assertError(await call(main, 'POST', '/v1/batches', { json: { ...good, input_file_id: done.output_file_id } }), 400,
    { param: 'input_file_id' });
});

test('batch-file validation failures: failed with line numbers and codes', async () => {
  const ok = (id, extra = {}) => ({ ...h.chatLine(id, 'hello', { max_tokens: 2 }), ...extra });
  const lines = [
    ok('v-1'), // 1
    '{"custom_id": "v-2", "method": "POST", ', // 2: not JSON
    { method: 'POST', url: '/v1/chat/completions', body: { messages: [{ role: 'user', content: 'x' }] } }, // 3
    ok('v-1'), // 4: duplicate of line 1
    ok('v-5', { method: 'GET' }), // 5
    ok('v-6', { url: '/v1/moderations' }), // 6
    { custom_id: 'v-7', method: 'POST', url: '/v1/completions', body: { prompt: 'x', max_tokens: 2 } }, // 7: valid, other endpoint
    ok('v-8'), // 8
  ];
  const f = await uploadRows(lines, 'invalid.jsonl');
  const created = await client.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  const b = await h.waitForBatch(client, created.id, ['failed', 'completed', 'in_progress']);
  assert.equal(b.status, 'failed');
  assert.equal(typeof b.failed_at, 'number');
  assert.equal(b.in_progress_at, null);
  assert.equal(b.output_file_id, null);
  assert.equal(b.error_file_id, null);
  assert.equal(b.errors.object, 'list');
  const got = b.errors.data.map((e) => [e.line, e.code]).sort((x, y) => x[0] - y[0]);
  assert.deepEqual(got, [
    [2, 'invalid_json'],
    [3, 'missing_custom_id'],
    [4, 'duplicate_custom_id'],
    [5, 'invalid_method'],
    [6, 'invalid_url'],
    [7, 'mismatched_endpoint'],
  ]);
  for (const e of b.errors.data) {
    assert.equal(typeof e.message, 'string');
    assert.ok(e.message.length > 0);
    assert.ok('param' in e);
  }
  // The input of a failed batch can be deleted.
  assert.equal((await call(main, 'DELETE', `/v1/files/${f.id}`)).status, 200);
});

test('an empty input file fails the batch with empty_file', async () => {
  const r = await uploadRaw(main, '', { filename: 'empty.jsonl' });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.body.bytes, 0);
  const content = await call(main, 'GET', `/v1/files/${r.body.id}/content`);
  assert.equal(content.status, 200);
  assert.equal(content.text, '');
  const created = await client.batches.create({ input_file_id: r.body.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  const b = await h.waitForBatch(client, created.id, ['failed', 'completed']);
  assert.equal(b.status, 'failed');
  assert.deepEqual(b.errors.data.map((e) => e.code), ['empty_file']);
  assert.equal(b.request_counts.total, 0);
});

test('chat/completions with invalid parameters: 400 naming the parameter', async () => {
  const msgs = [{ role: 'user', content: 'hello' }];
  const cases = [
    [{ messages: msgs, temperature: 5 }, 'temperature'],
    [{ messages: msgs, n: 0 }, 'n'],
    [{ messages: msgs, n: 129 }, 'n'],
    [{ messages: msgs, top_p: 0 }, 'top_p'],
    [{ messages: msgs, max_tokens: 0 }, 'max_tokens'],
    [{ messages: msgs, presence_penalty: 3 }, 'presence_penalty'],
    [{ messages: msgs, stream: 'yes' }, 'stream'],
  ];
  for (const [body, param] of cases) {
    const e = assertError(await call(main, 'POST', '/v1/chat/completions', { json: { model: 'tiny', ...body } }), 400,
      { param, type: 'invalid_request_error' });
    assert.match(e.message, new RegExp(param));
  }
  // Structural problems are 400 as well.
  assertError(await call(main, 'POST', '/v1/chat/completions', { json: { model: 'tiny' } }), 400);
  assertError(await call(main, 'POST', '/v1/chat/completions', { json: { messages: 'hi' } }), 400);
  assertError(await call(main, 'POST', '/v1/completions', { json: { prompt: 'x', temperature: -1 } }), 400,
    { param: 'temperature' });
  await assert.rejects(
    client.chat.completions.create({ model: 'tiny', messages: msgs, temperature: 5 }),
    (err) => err instanceof APIError && err.status === 400 && err.param === 'temperature');
});

test('deleting a file: 409 while its batch runs, 200 after, then 404', async () => {
  const rows = h.chatRows(40, { prefix: 'del-', body: { max_tokens: 16 } });
  const f = await uploadRows(rows, 'del.jsonl');
  const created = await client.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  const busy = assertError(await call(main, 'DELETE', `/v1/files/${f.id}`), 409);
  assert.match(busy.message, new RegExp(created.id));
  const b = await h.waitForBatch(client, created.id, ['completed', 'failed']);
  assert.equal(b.status, 'completed');
  const d = await call(main, 'DELETE', `/v1/files/${f.id}`);
  assert.equal(d.status, 200, d.text);
  assert.deepEqual(d.body, { id: f.id, object: 'file', deleted: true });
  assertError(await call(main, 'GET', `/v1/files/${f.id}`), 404);
  assertError(await call(main, 'GET', `/v1/files/${f.id}/content`), 404);
  assertError(await call(main, 'DELETE', `/v1/files/${f.id}`), 404);
  const ids = (await client.files.list()).data.map((x) => x.id);
  assert.ok(!ids.includes(f.id));
  // The batch object still names its (deleted) input; its results are intact.
  assert.equal((await client.batches.retrieve(b.id)).input_file_id, f.id);
  const { output } = await h.batchResults(client, b);
  assert.equal(output.length, 40);
  // Deleting through the SDK.
  const del = await client.files.delete(b.output_file_id);
  assert.equal(del.deleted, true);
});

test('list parameters are validated', async () => {
  assertError(await call(main, 'GET', '/v1/batches?limit=0'), 400, { param: 'limit' });
  assertError(await call(main, 'GET', '/v1/batches?limit=abc'), 400, { param: 'limit' });
  assertError(await call(main, 'GET', '/v1/files?order=sideways'), 400, { param: 'order' });
  const r = await call(main, 'GET', '/v1/batches?limit=1');
  assert.equal(r.status, 200);
  assert.equal(r.body.object, 'list');
  assert.equal(r.body.data.length, 1);
  assert.equal(r.body.has_more, true);
  assert.equal(r.body.first_id, r.body.data[0].id);
  assert.equal(r.body.last_id, r.body.data[0].id);
});

test('the server still serves after all of that', async () => {
  const r = await call(main, 'GET', '/health');
  assert.equal(r.status, 200);
  assert.deepEqual(r.body, { status: 'ok' });
  const c = await client.chat.completions.create({ model: 'tiny', max_tokens: 2, messages: [{ role: 'user', content: 'still there?' }] });
  assert.equal(c.usage.completion_tokens, 2);
  assert.equal(main.proc.exitCode, null);
});
