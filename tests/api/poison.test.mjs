// A poison request that crashes `kvbatch serve` (the test-only hook
// KVBATCH_TEST_CRASH_ON aborts the process when that request starts): the
// server crashes at most twice on it, then fails it with
// request_crashed_engine and completes the rest of its batch.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import * as h from './helpers.mjs';

let work;

before(async () => {
  work = await h.makeWorkDir('kvbatch-poison-');
});

after(() => h.removeDir(work && work.dir));

test('a request that crashes the server twice is failed and the batch completes', async () => {
  const dataDir = path.join(work.dir, 'data');
  const env = { KVBATCH_TEST_CRASH_ON: 'req-7' };
  const ids = Array.from({ length: 16 }, (_, i) => `req-${i}`);
  const input = h.makeInputFile(work.dir, 'in.jsonl', h.chatRows(16, { body: { max_tokens: 4 } }));

  // Start 1: the batch runs until req-7 starts, then the process aborts.
  let s = await h.startServer({ model: work.model, dataDir, env });
  const client = s.client();
  const file = await h.uploadFile(client, input);
  const batch = await client.batches.create({
    input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h',
  });
  const first = await h.withTimeout(s.exited, 60000, 'timeout');
  assert.notEqual(first, 'timeout', 'the server did not crash on the poison request');
  assert.equal(first.signal, 'SIGABRT', `exit: ${JSON.stringify(first)}\n${s.stderr()}`);

  // Start 2: the requests that were in flight run again, alone; req-7 aborts again.
  s = await h.startServer({ model: work.model, dataDir, env });
  const second = await h.withTimeout(s.exited, 60000, 'timeout');
  assert.notEqual(second, 'timeout', 'the poison request was not run again');
  assert.equal(second.signal, 'SIGABRT');
  assert.match(s.stderr(), /running when the server stopped unexpectedly/);

  // Start 3: req-7 is failed without running; the rest complete.
  s = await h.startServer({ model: work.model, dataDir, env });
  try {
    const c = s.client();
    const done = await h.waitForBatch(c, batch.id, ['completed', 'failed', 'expired', 'cancelled'], 60000);
    assert.equal(done.status, 'completed');
    assert.equal(done.request_counts.total, 16);
    assert.equal(done.request_counts.failed, 1);
    const { output, errors } = await h.batchResults(c, done);
    h.assertCoverage(assert, ids, [...output, ...errors]);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].custom_id, 'req-7');
    assert.equal(errors[0].error.code, 'request_crashed_engine');
    for (const o of output) assert.equal(o.response.status_code, 200);
    assert.ok((await fetch(`http://127.0.0.1:${s.port}/health`)).ok);
  } finally {
    await h.stopServer(s);
  }
});
