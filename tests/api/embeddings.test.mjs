// /v1/embeddings online (the official SDK, which asks for base64 and decodes
// it) and as batch lines (the Batch API and `kvbatch run`), on the tiny
// decoder model with last-token pooling: vectors of the model's width, unit
// length, each equal to the same input embedded alone.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  makeWorkDir, removeDir, startServer, stopServer, makeInputFile, uploadFile, waitForBatch, batchResults,
  httpCall, kvbatchRun, assertCoverage,
} from './helpers.mjs';

const WIDTH = 64;  // the tiny preset's n_embd
let work;
let server;
let client;

before(async () => {
  work = await makeWorkDir('kvbatch-embed-');
  server = await startServer({ model: work.model, dataDir: path.join(work.dir, 'data') });
  client = server.client();
});

after(async () => {
  await stopServer(server);
  removeDir(work && work.dir);
});

const cosine = (a, b) => {
  let d = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    d += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return d / Math.sqrt(na * nb);
};
const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
const texts = Array.from({ length: 40 }, (_, i) => `Candidate ${i}: ${'experienced '.repeat(i % 7)}logistics lead`);

test('one input and many in one request: unit vectors of the model width, each as if alone', async () => {
  const one = await client.embeddings.create({ model: 'tiny', input: texts[3] });
  assert.equal(one.object, 'list');
  assert.equal(one.data.length, 1);
  assert.equal(one.data[0].embedding.length, WIDTH);
  assert.ok(Math.abs(norm(one.data[0].embedding) - 1) < 1e-4);
  assert.ok(one.usage.prompt_tokens > 0);
  assert.equal(one.usage.total_tokens, one.usage.prompt_tokens);
  assert.equal(one.model, 'tiny');

  const many = await client.embeddings.create({ model: 'tiny', input: texts });
  assert.equal(many.data.length, texts.length);
  many.data.forEach((d, i) => assert.equal(d.index, i));
  const alone = await Promise.all(texts.slice(0, 12).map((t) => client.embeddings.create({ model: 'tiny', input: t })));
  alone.forEach((a, i) => assert.ok(cosine(a.data[0].embedding, many.data[i].embedding) > 0.999, `input ${i}`));
  // Different inputs, different vectors.
  assert.ok(cosine(many.data[0].embedding, many.data[5].embedding) < 0.999);

  // Floats on request, equal to the SDK's decoded base64.
  const floats = await httpCall(server.port, 'POST', '/v1/embeddings',
    { json: { model: 'tiny', input: texts[3], encoding_format: 'float' } });
  assert.equal(floats.status, 200);
  assert.ok(cosine(floats.body.data[0].embedding, one.data[0].embedding) > 0.99999);
  const b64 = await httpCall(server.port, 'POST', '/v1/embeddings',
    { json: { model: 'tiny', input: texts[3], encoding_format: 'base64' } });
  const buf = Buffer.from(b64.body.data[0].embedding, 'base64');
  const decoded = Array.from(new Float32Array(buf.buffer, buf.byteOffset, buf.length / 4));
  assert.deepEqual(decoded, floats.body.data[0].embedding.map((x) => Math.fround(x)));

  // Token arrays.
  const tokens = await httpCall(server.port, 'POST', '/v1/embeddings', { json: { input: [[1, 450, 4996], [1, 22172]] } });
  assert.equal(tokens.status, 200, JSON.stringify(tokens.body));
  assert.equal(tokens.body.data.length, 2);
  assert.equal(tokens.body.usage.prompt_tokens, 5);
});

test('bad embeddings requests get a 400 naming the field', async () => {
  const cases = [
    [{ input: '' }, 'input'],
    [{ input: [] }, 'input'],
    [{ input: ['ok', 3] }, 'input[1]'],
    [{ input: [[1, -2]] }, 'input[0][1]'],
    [{ input: [1, 2, 1e12] }, 'input[2]'],
    [{ input: Array.from({ length: 2049 }, () => 'x') }, 'input'],
    [{ input: 'x', dimensions: 8 }, 'dimensions'],
    [{ input: 'x', encoding_format: 'int8' }, 'encoding_format'],
    [{ input: 'x', stream: true }, 'stream'],
    [{ input: [[1, 999999]] }, 'input'],
  ];
  for (const [body, param] of cases) {
    const r = await httpCall(server.port, 'POST', '/v1/embeddings', { json: body });
    assert.equal(r.status, 400, JSON.stringify(body).slice(0, 80));
    assert.equal(r.body.error.param, param, JSON.stringify(r.body));
  }
  const health = await httpCall(server.port, 'GET', '/health');
  assert.equal(health.status, 200);
});

test('an embeddings batch through the Batch API and kvbatch run: every line, each as if alone', async () => {
  const rows = texts.map((t, i) => ({
    custom_id: `emb-${i}`, method: 'POST', url: '/v1/embeddings',
    body: { model: 'tiny', input: i % 5 === 0 ? [t, `${t} (again)`] : t },
  }));
  rows.push({ custom_id: 'emb-bad', method: 'POST', url: '/v1/embeddings', body: { model: 'tiny', input: [[1, 999999]] } });
  const input = makeInputFile(work.dir, 'embed.jsonl', rows);
  const file = await uploadFile(client, input);
  const batch = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/embeddings', completion_window: '24h' });
  const done = await waitForBatch(client, batch.id, ['completed', 'failed'], 60000);
  assert.equal(done.status, 'completed', JSON.stringify(done.errors));
  assert.deepEqual(done.request_counts, { total: rows.length, completed: rows.length - 1, failed: 1 });
  const { output, errors } = await batchResults(client, done);
  assertCoverage(assert, rows.map((r) => r.custom_id), [...output, ...errors]);
  const byId = Object.fromEntries(output.map((l) => [l.custom_id, l.response.body]));
  let tokens = 0;
  for (let i = 0; i < texts.length; i++) {
    const body = byId[`emb-${i}`];
    assert.equal(body.object, 'list');
    assert.equal(body.data.length, i % 5 === 0 ? 2 : 1);
    assert.equal(body.data[0].embedding.length, WIDTH);
    tokens += body.usage.prompt_tokens;
  }
  assert.equal(done.usage.input_tokens, tokens);  // a line refused before running counts no tokens
  assert.equal(errors[0].response.status_code, 400);
  const alone = await client.embeddings.create({ model: 'tiny', input: texts[7] });
  assert.ok(cosine(alone.data[0].embedding, byId['emb-7'].data[0].embedding) > 0.999);

  const lines = await kvbatchRun(work.model, input, path.join(work.dir, 'embed-out.jsonl'), ['--threads', '1']);
  assert.equal(lines.length, rows.length);
  const run7 = lines.find((l) => l.custom_id === 'emb-7').response.body.data[0].embedding;
  assert.ok(cosine(run7, byId['emb-7'].data[0].embedding) > 0.999);
  assert.ok(fs.existsSync(path.join(work.dir, 'embed-out.jsonl')));
});

test('embeddings count in the engine metrics: requests and prompt tokens', async () => {
  const counter = (text, name) => {
    const m = new RegExp(`^${name}\\{engine="0"\\} (\\S+)$`, 'm').exec(text);
    return m ? Number(m[1]) : NaN;
  };
  const scrape = async () => (await httpCall(server.port, 'GET', '/metrics')).text;
  const before = await scrape();
  const r = await httpCall(server.port, 'POST', '/v1/embeddings', { json: { input: [[1, 450, 4996], [1, 22172]] } });
  assert.equal(r.status, 200);
  const after = await scrape();
  assert.equal(counter(after, 'kvbatch_prompt_tokens_total') - counter(before, 'kvbatch_prompt_tokens_total'), 5);
});
