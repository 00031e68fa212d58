// Data parallel in one process: `kvbatch serve --devices cpu,cpu` runs two
// engines (a copy of the model each) fed by one batch driver; both take
// chunks of the same batch, every line is answered once, and online requests
// still work (they go to the first engine).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import * as h from './helpers.mjs';

let work;

before(async () => {
  work = await h.makeWorkDir('kvbatch-devices-');
});

after(() => h.removeDir(work && work.dir));

test('two engines in one server share a batch, each line once', async () => {
  const s = await h.startServer({
    model: work.model, dataDir: path.join(work.dir, 'data'),
    extraArgs: ['--devices', 'cpu,cpu', '--chunk-rows', '10', '--window', '12'],
  });
  let stopped = null;
  try {
    assert.match(s.stdout(), /CPU, \d+ sequences, \d+ KV cells; CPU, \d+ sequences/);
    const client = s.client();
    const ids = Array.from({ length: 80 }, (_, i) => `req-${i}`);
    const input = h.makeInputFile(work.dir, 'in.jsonl', h.chatRows(80, { body: { max_tokens: 8 } }));
    const file = await h.uploadFile(client, input);
    const batch = await client.batches.create({
      input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h',
    });
    const done = await h.waitForBatch(client, batch.id, ['completed', 'failed', 'expired', 'cancelled'], 120000);
    assert.equal(done.status, 'completed');
    const { output, errors } = await h.batchResults(client, done);
    h.assertCoverage(assert, ids, [...output, ...errors]);
    assert.equal(errors.length, 0);
    const chat = await client.chat.completions.create({
      model: 'any', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4,
    });
    assert.ok(chat.choices[0].message.content.length >= 0);
  } finally {
    stopped = await h.stopServer(s);
  }
  assert.equal(stopped.code, 0);
  // Each engine claimed and committed part of the batch.
  const per = [...s.stderr().matchAll(/kvbatch serve engine (\d): (\d+) chunks claimed .* (\d+) results committed/g)];
  assert.equal(per.length, 2, s.stderr());
  for (const m of per) assert.ok(Number(m[3]) > 0, `engine ${m[1]} committed nothing:\n${s.stderr()}`);
  assert.equal(per.reduce((a, m) => a + Number(m[3]), 0), 80);
});
