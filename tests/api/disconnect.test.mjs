// A non-streaming completion whose client goes away is cancelled: the
// engine stops generating for nobody and its online place is freed at once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import * as h from './helpers.mjs';

let work;
let srv;

before(async () => {
  work = await h.makeWorkDir('kvbatch-disconnect-');
  srv = await h.startServer({
    model: work.model, dataDir: path.join(work.dir, 'data'), extraArgs: ['--max-online-requests', '1'],
  });
});

after(async () => {
  await h.stopServer(srv);
  h.removeDir(work && work.dir);
});

const post = (body, signal) =>
  fetch(`http://127.0.0.1:${srv.port}/v1/completions`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), signal,
  });

test('a disconnected non-streaming request is cancelled and frees its place', async () => {
  // Long: the whole context, end-of-text forbidden (token 2 in the Llama SPM vocab).
  const long = { model: 'tiny', prompt: 'Once upon a time', max_tokens: 100000, logit_bias: { 2: -100 } };
  const started = Date.now();
  const ctl = new AbortController();
  const first = post(long, ctl.signal).catch((e) => e);
  // Wait until the server counts it (a probe sent earlier could take the
  // place first and leave the long request a 429).
  for (const deadline = Date.now() + 5000; Date.now() < deadline;) {
    const engines = await (await fetch(`http://127.0.0.1:${srv.port}/v1/engines`)).json();
    if (engines.node.online_requests >= 1) break;
    await h.sleep(20);
  }
  // While it runs, the only online place is taken.
  let busy;
  for (const deadline = Date.now() + 5000; Date.now() < deadline;) {
    busy = await post({ model: 'tiny', prompt: 'hi', max_tokens: 1 });
    await busy.text();
    if (busy.status === 429) break;
  }
  assert.equal(busy.status, 429, 'the long request should hold the single online place');
  ctl.abort();
  assert.equal((await first).name, 'AbortError');
  // Once the server notices, the request is cancelled and the place comes back.
  let ok;
  const freed = Date.now();
  for (const deadline = Date.now() + 3000; Date.now() < deadline;) {
    ok = await post({ model: 'tiny', prompt: 'hi', max_tokens: 1 });
    await ok.text();
    if (ok.status === 200) break;
    await h.sleep(50);
  }
  assert.equal(ok.status, 200, 'the place was not freed: the disconnected request kept running');
  const freedMs = Date.now() - freed;
  console.log(`# place freed ${freedMs} ms after the disconnect (${Date.now() - started} ms in all)`);
  // Had it kept running, even a part of the context would have taken longer.
  const t0 = Date.now();
  const part = await post({ ...long, max_tokens: 1000 });
  const body = await part.json();
  assert.equal(part.status, 200, JSON.stringify(body));
  const genMs = Date.now() - t0;
  console.log(`# 1000 tokens take ${genMs} ms to generate`);
  assert.ok(genMs > freedMs, `the place came back (${freedMs} ms) before 1000 tokens could run (${genMs} ms)`);
});
