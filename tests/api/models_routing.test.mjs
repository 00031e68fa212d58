// `kvbatch serve -m A -m B --max-models 1` through the official SDK: the
// model field of each request routes it, /v1/models lists both, an unknown
// model is a 404 model_not_found (online) or an error line (batch), a batch
// mixing models answers each line with its own model, and with room for one
// model at a time the server swaps them (the least recently used idle one
// goes).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import {
  KVBATCH_BIN, childEnv, makeWorkDir, removeDir, startServer, stopServer, makeInputFile, uploadFile, waitForBatch,
  batchResults, assertCoverage, httpCall,
} from './helpers.mjs';

const execFileP = promisify(execFile);
let work;
let server;
let client;

before(async () => {
  work = await makeWorkDir('kvbatch-models-');
  const other = path.join(work.dir, 'other.gguf');
  await execFileP(KVBATCH_BIN, ['gen-model', '--preset', 'tiny', '--seed', '7', '-o', other], { env: childEnv() });
  server = await startServer({
    model: work.model, dataDir: path.join(work.dir, 'data'), extraArgs: ['-m', other, '--max-models', '1'],
  });
  client = server.client();
});

after(async () => {
  await stopServer(server);
  removeDir(work && work.dir);
});

const ask = (model, text) => client.chat.completions.create({ model, messages: [{ role: 'user', content: text }], max_tokens: 4, temperature: 0 });

test('/v1/models lists every model; requests go to the one they name', async () => {
  const list = await client.models.list();
  assert.deepEqual(list.data.map((m) => m.id), ['tiny', 'other']);
  assert.equal((await client.models.retrieve('other')).id, 'other');
  const a = await ask('tiny', 'hello');
  const b = await ask('other', 'hello');
  assert.equal(a.model, 'tiny');
  assert.equal(b.model, 'other');
  // Different weights, different answers to the same prompt (greedy).
  const a2 = await ask('tiny', 'hello');
  assert.equal(a2.choices[0].message.content, a.choices[0].message.content);
  await assert.rejects(ask('gpt-4o', 'hello'), (e) => e.status === 404 && e.code === 'model_not_found' && e.param === 'model');
  // One model at a time (--max-models 1): the engines panel shows which.
  const engines = await httpCall(server.port, 'GET', '/v1/engines');
  assert.equal(engines.status, 200);
  const loaded = engines.body.data.filter((e) => e.device !== 'not loaded').map((e) => e.model);
  assert.deepEqual(loaded, ['tiny']);
  assert.match(server.stderr(), /unloading model tiny to make room for other/);
});

test('a batch mixing models answers each line with its model, unknown ones with model_not_found', async () => {
  const models = ['tiny', 'other', 'missing'];
  const rows = Array.from({ length: 18 }, (_, i) => ({
    custom_id: `m${i}`, method: 'POST', url: '/v1/chat/completions',
    body: { model: models[i % 3], messages: [{ role: 'user', content: `line ${i}` }], max_tokens: 3 },
  }));
  const file = await uploadFile(client, makeInputFile(work.dir, 'mixed.jsonl', rows));
  const created = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  const batch = await waitForBatch(client, created.id, ['completed', 'failed'], 90000);
  assert.equal(batch.status, 'completed');
  assert.equal(batch.request_counts.completed, 12);
  assert.equal(batch.request_counts.failed, 6);
  const { output, errors } = await batchResults(client, batch);
  assertCoverage(assert, rows.map((r) => r.custom_id), [...output, ...errors]);
  for (const line of output) assert.equal(line.response.body.model, models[Number(line.custom_id.slice(1)) % 3]);
  for (const line of errors) {
    assert.equal(line.response.status_code, 404);
    assert.equal(line.response.body.error.code, 'model_not_found');
  }
});
