// The web dashboard (web/, served by `kvbatch serve` at /) in a real browser:
// headless Debian chromium driven by playwright-core, against a server started
// with --api-key. Upload and create a batch from the page and watch it
// complete, pause / resume / priority / cancel from a batch page, download the
// output, the error lists, the engine panel, the API key handling (key form,
// URL fragment, forget key), and no console errors. Screenshots go to
// $KVBATCH_ARTIFACTS_DIR (default: a temporary directory, printed), and to
// docs/ with KVBATCH_UPDATE_SCREENSHOTS=1.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import * as h from './helpers.mjs';

const CHROMIUM = process.env.KVBATCH_CHROMIUM || '/usr/bin/chromium';
const KEY = `dash-key-${process.pid}-${Date.now().toString(36)}`;
const DOCS = fileURLToPath(new URL('../../docs/', import.meta.url));
const ARTIFACTS = process.env.KVBATCH_ARTIFACTS_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'kvbatch-dashboard-'));
const WAIT = 30000;

let work; // { dir, model }
let server;
let client; // OpenAI SDK with the key
let origin; // http://127.0.0.1:PORT
let browser;
let page;
const consoleErrors = [];
const state = {}; // batch ids shared between tests

before(async () => {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} not found: the dashboard test needs Debian's 'chromium' package ` +
      '(apt-get install chromium), or KVBATCH_CHROMIUM=/path/to/chromium');
  }
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  console.log(`dashboard screenshots: ${ARTIFACTS}`);
  work = await h.makeWorkDir('kvbatch-dash-');
  // A small window and chunks: pause and cancel take effect after a few requests, not after all of them.
  server = await h.startServer({
    model: work.model, dataDir: path.join(work.dir, 'data'),
    extraArgs: ['--api-key', KEY, '--window', '8', '--chunk-rows', '8'],
  });
  client = server.client(KEY);
  origin = `http://127.0.0.1:${server.port}`;
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, acceptDownloads: true });
  page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('pageerror', (e) => consoleErrors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // The browser logs every 401 answer; those are expected while no key is set.
    if (/Failed to load resource: the server responded with a status of 401/.test(m.text())) return;
    consoleErrors.push(`console.error: ${m.text()}`);
  });
});

after(async () => {
  if (browser) await browser.close();
  await h.stopServer(server);
  h.removeDir(work && work.dir);
});

// ---- helpers ----------------------------------------------------------------

// Polls fn() until it returns a truthy value; returns it.
async function until(what, fn, timeoutMs = WAIT, intervalMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await h.sleep(intervalMs);
  }
}

const text = async (selector) => ((await page.locator(selector).first().textContent()) || '').trim();
const attr = (selector, name) => page.locator(selector).first().getAttribute(name);
const visible = (selector) => page.locator(selector).first().isVisible();

async function screenshot(name) {
  const file = path.join(ARTIFACTS, name);
  await page.evaluate(() => document.getElementById('toasts')?.remove());
  await page.screenshot({ path: file, fullPage: true });
  if (process.env.KVBATCH_UPDATE_SCREENSHOTS === '1') fs.copyFileSync(file, path.join(DOCS, name));
  return file;
}

async function createBatch(rows, name, body = {}) {
  const f = await h.uploadFile(client, h.makeInputFile(work.dir, name, rows));
  return client.batches.create({ input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h', ...body });
}

async function openBatchPage(id) {
  await page.goto(`${origin}/#/batch/${id}`);
  await page.locator(`#batch-view[data-batch-id="${id}"] #batch-status`).waitFor();
}

// The page's "N of M requests answered" for the batch on screen.
async function pageAnswered() {
  const m = /^([\d,]+) of ([\d,]+) requests answered/.exec(await text('#batch-counts'));
  assert.ok(m, 'the batch page shows its counts');
  return Number(m[1].replace(/,/g, ''));
}

const answered = (b) => b.request_counts.completed + b.request_counts.failed;

// ---- tests ------------------------------------------------------------------

test('the page and its assets load without a key; the /v1 API needs it', async () => {
  for (const [p, type] of [['/', 'text/html'], ['/app.js', 'text/javascript'], ['/style.css', 'text/css'], ['/favicon.svg', 'image/svg+xml']]) {
    const r = await h.httpCall(server.port, 'GET', p);
    assert.equal(r.status, 200, `GET ${p}`);
    assert.ok(r.headers.get('content-type').startsWith(type), `content type of ${p}: ${r.headers.get('content-type')}`);
  }
  assert.equal((await h.httpCall(server.port, 'GET', '/v1/batches')).status, 401);
});

test('without a key the page asks for one; a wrong key is refused; #key= in the URL is taken and hidden', async () => {
  await page.goto(`${origin}/`);
  await page.locator('#key-form').waitFor();
  await page.fill('#key-input', 'not-the-key');
  await page.click('#key-submit');
  await until('the wrong key to be refused', async () => /Incorrect API key/.test(await text('#key-form')));
  assert.equal(await page.evaluate(() => localStorage.getItem('kvbatch.apiKey')), 'not-the-key');

  // The fragment is never sent to the server; the page keeps the key and drops it from the address bar.
  await page.goto(`${origin}/#key=${encodeURIComponent(KEY)}`);
  await page.locator('#batches-table').waitFor();
  await until('the key form to go', async () => !(await visible('#key-form')));
  await until('the list to load', async () => /No batches yet|batch/.test(await text('#batch-rows')));
  assert.ok(!page.url().includes('key='), `the key stays in the address bar: ${page.url()}`);
  assert.equal(await page.evaluate(() => localStorage.getItem('kvbatch.apiKey')), KEY);
  assert.ok(await visible('#forget-key'));
});

test('upload a JSONL file and create a batch from the page; it completes', async () => {
  const rows = h.chatRows(48, { prefix: 'a-', body: { max_tokens: 16 } });
  // Two requests that fail: one with markup for a custom_id (shown as text, never run).
  rows.push(h.chatLine('<img src=x onerror="window.__xss=1">', 'Where is my parcel?', { max_tokens: 4, temperature: 7 }));
  rows.push(h.chatLine('a-bad-top-p', 'Where is my parcel?', { max_tokens: 4, top_p: 5 }));
  const file = h.makeInputFile(work.dir, 'page-upload.jsonl', rows);

  await page.setInputFiles('#upload-file', file);
  await page.selectOption('#upload-endpoint', '/v1/chat/completions');
  await page.fill('#upload-priority', '3');
  await page.click('#upload-submit');
  const id = (await page.locator('#upload-created').textContent({ timeout: WAIT })).trim();
  assert.match(id, /^batch_/);
  state.uploaded = id;

  const b = await client.batches.retrieve(id);
  assert.equal(b.endpoint, '/v1/chat/completions');
  assert.equal(b.metadata.priority, '3');
  assert.equal(b.kvbatch.priority, 3);

  // The list shows it, then its progress bar full and the status completed.
  const row = `tr[data-batch-id="${id}"]`;
  await page.locator(row).waitFor();
  await page.locator(`${row} .badge[data-status="completed"]`).waitFor({ timeout: 45000 });
  assert.equal(await attr(`${row} [role=progressbar]`, 'aria-valuenow'), '100.0');
  assert.equal(await text(`${row} .progress-label`), '50 / 50');
  assert.equal(await text(`${row} .col-priority`), '3');
  await until('the error kinds of the finished batch', async () => /invalid_request ×2|2 failed/.test(await text(`${row} .col-errors`)));
});

test('a batch page shows the finished batch, its failed requests as text, and downloads its output', async () => {
  const id = state.uploaded;
  await page.click(`tr[data-batch-id="${id}"] a.batch-link`);
  await page.locator(`#batch-view[data-batch-id="${id}"]`).waitFor();
  assert.equal(await attr('#batch-status', 'data-status'), 'completed');
  assert.equal(await attr('#batch-progress', 'aria-valuenow'), '100.0');
  assert.match(await text('#batch-counts'), /^50 of 50 requests answered · 48 ok · 2 failed/);

  // Failed requests from the error file: custom_id, code and message, as text.
  await page.locator('#request-errors').waitFor();
  const rows = await page.locator('#request-errors tbody tr').allTextContents();
  assert.equal(rows.length, 2);
  const xssRow = rows.find((r) => r.includes('<img src=x onerror="window.__xss=1">'));
  assert.ok(xssRow, `the markup custom_id is shown as text: ${rows.join(' | ')}`);
  assert.match(xssRow, /temperature/);
  assert.ok(rows.some((r) => r.includes('a-bad-top-p') && /top_p/.test(r)));
  assert.equal(await page.locator('#request-errors img').count(), 0);
  assert.equal(await page.evaluate(() => window.__xss), undefined);

  // The output file through the page's download button (a blob: URL: the request carried the key).
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download-output')]);
  const saved = path.join(work.dir, 'downloaded-output.jsonl');
  await download.saveAs(saved);
  assert.equal(download.suggestedFilename(), `${id}_output.jsonl`);
  const lines = h.parseJsonl(fs.readFileSync(saved, 'utf8'));
  assert.equal(lines.length, 48);
  assert.deepEqual(lines.map((l) => l.custom_id).sort(), Array.from({ length: 48 }, (_, i) => `a-${i}`).sort());
  for (const l of lines) {
    assert.equal(l.response.status_code, 200);
    assert.equal(l.response.body.object, 'chat.completion');
  }
});

test('pause, set the priority and resume from the batch page', async () => {
  const b0 = await createBatch(h.chatRows(60, { prefix: 'b-', body: { max_tokens: 200 } }), 'pause.jsonl');
  state.paused = b0.id;
  await openBatchPage(b0.id);
  // Some progress first, so that "does not advance while paused" means something.
  await until('the first answers', async () => Number(await attr('#batch-progress', 'aria-valuenow')) > 0, WAIT, 50);
  await page.click('#btn-pause');
  await page.locator('#batch-paused').waitFor();
  await page.locator('#btn-resume').waitFor();
  let b = await client.batches.retrieve(b0.id);
  assert.equal(b.kvbatch.paused, true);

  // Requests in flight still finish; then the counts stop.
  b = await h.waitForBatch(client, b0.id, [], WAIT, { until: (x) => x.kvbatch.in_flight === 0 });
  const frozen = answered(b);
  assert.ok(frozen < b.request_counts.total, `the batch finished before it was paused (${frozen} answered)`);
  assert.equal(b.status, 'in_progress');
  for (let i = 0; i < 6; i++) {
    await h.sleep(250);
    assert.equal(answered(await client.batches.retrieve(b0.id)), frozen, 'a paused batch advanced');
  }
  await until('the page to show the frozen count', async () => (await pageAnswered()) === frozen);
  assert.equal(await text('#tile-eta .tile-value'), 'paused');

  // Priority from the page, seen by the API.
  await page.fill('#priority-input', '7');
  await page.click('#btn-priority');
  await until('the priority to be set', async () => (await client.batches.retrieve(b0.id)).kvbatch.priority === 7);

  await page.click('#btn-resume');
  await until('the paused badge to go', async () => !(await visible('#batch-paused')));
  await page.locator('#btn-pause').waitFor();
  b = await client.batches.retrieve(b0.id);
  assert.equal(b.kvbatch.paused, false);
  assert.equal(b.kvbatch.priority, 7);
  await until('the batch to advance again', async () => answered(await client.batches.retrieve(b0.id)) > frozen);
  await until('the page to show the progress', async () => (await pageAnswered()) > frozen);
  // The live charts have data from the event stream and the engine polling.
  for (const chart of ['#chart-rps', '#chart-tps', '#chart-kv', '#chart-mem']) await page.locator(`${chart} path.chart-line`).first().waitFor();
  assert.equal(await page.inputValue('#priority-input'), '7');
  await screenshot('dashboard-batch.png');
});

test('cancel a running batch from its page', async () => {
  // Priority over the batch still running from the test before, so that it starts at once.
  const c0 = await createBatch(h.chatRows(60, { prefix: 'c-', body: { max_tokens: 200 } }), 'cancel.jsonl',
    { metadata: { priority: '10' } });
  state.cancelled = c0.id;
  await openBatchPage(c0.id);
  await until('the first answers', async () => Number(await attr('#batch-progress', 'aria-valuenow')) > 0, WAIT, 50);
  await page.click('#btn-cancel');
  await page.click('#btn-cancel-confirm');
  await until('the page to show cancelling or cancelled',
    async () => ['cancelling', 'cancelled'].includes(await attr('#batch-status', 'data-status')));
  const c = await h.waitForBatch(client, c0.id, ['cancelled'], WAIT);
  // The requests not answered count as failed (batch_cancelled lines in the error file).
  assert.ok(c.request_counts.completed > 0 && c.request_counts.completed < c.request_counts.total,
    `cancelled mid-run: ${JSON.stringify(c.request_counts)}`);
  await page.locator('#batch-status[data-status="cancelled"]').waitFor();
  assert.equal(await page.locator('#btn-pause, #btn-resume, #btn-cancel').count(), 0);
});

test('input file problems are listed with their line numbers', async () => {
  const d = await createBatch([
    h.chatLine('d-1', 'Hello'),
    '{not json',
    { custom_id: 'd-1', method: 'POST', url: '/v1/chat/completions', body: { messages: [{ role: 'user', content: '<b>x</b>' }] } },
  ], 'invalid.jsonl');
  state.invalid = d.id;
  await h.waitForBatch(client, d.id, ['failed'], WAIT);
  await openBatchPage(d.id);
  await page.locator('#batch-status[data-status="failed"]').waitFor();
  await page.locator('#input-errors').waitFor();
  const rows = await page.locator('#input-errors tbody tr').evaluateAll((trs) =>
    trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())));
  assert.deepEqual(rows.map((r) => [r[0], r[1]]), [['2', 'invalid_json'], ['3', 'duplicate_custom_id']]);
});

test('the engine panel shows the model and its KV cells; the list shows every batch', async () => {
  const r = await h.httpCall(server.port, 'GET', '/v1/engines', { headers: { Authorization: `Bearer ${KEY}` } });
  assert.equal(r.status, 200);
  const engine = r.body.data[0];
  const model = (await client.models.list()).data[0].id;
  await page.goto(`${origin}/#/`);
  await page.locator('#engine-panel .engine-model').waitFor();
  assert.equal(await text('#engine-panel .engine-model'), model);
  assert.equal(engine.model, model);
  assert.match(await text('#engine-panel .engine-kv'), new RegExp(`/ ${engine.kv_cells.toLocaleString('en-US')} used`));
  assert.match(await text('#engine-panel'), /Running/);
  assert.match(await text('#header-engine'), new RegExp(model));

  for (const [id, status] of [[state.uploaded, 'completed'], [state.cancelled, 'cancelled'], [state.invalid, 'failed']]) {
    await page.locator(`tr[data-batch-id="${id}"] .badge[data-status="${status}"]`).waitFor();
  }
  await page.locator(`tr[data-batch-id="${state.paused}"]`).waitFor();
  // One batch still running when the screenshot is taken.
  const e = await createBatch(h.chatRows(200, { prefix: 'e-', body: { max_tokens: 64 } }), 'running.jsonl',
    { metadata: { priority: '20' } });
  await until('the running batch to show progress', async () =>
    Number(await attr(`tr[data-batch-id="${e.id}"] [role=progressbar]`, 'aria-valuenow')) > 0);
  assert.match(await text(`tr[data-batch-id="${e.id}"] .col-status`), /in progress/);
  assert.equal(await text(`tr[data-batch-id="${state.paused}"] .col-priority`), '7');
  assert.match(await text(`tr[data-batch-id="${state.invalid}"] .col-errors`), /invalid_json ×1/);
  await until('the error kinds of the uploaded batch', async () =>
    /invalid_request ×2/.test(await text(`tr[data-batch-id="${state.uploaded}"] .col-errors`)));
  await screenshot('dashboard.png');
});

test('forget key: the page asks again, and the key form lets it back in', async () => {
  await page.click('#forget-key');
  await page.locator('#key-form').waitFor();
  assert.equal(await page.evaluate(() => localStorage.getItem('kvbatch.apiKey')), null);
  await page.fill('#key-input', KEY);
  await page.click('#key-submit');
  await until('the key form to go', async () => !(await visible('#key-form')));
  await page.locator(`tr[data-batch-id="${state.uploaded}"]`).waitFor();
  assert.equal(await page.evaluate(() => localStorage.getItem('kvbatch.apiKey')), KEY);
});

test('no console errors', () => {
  assert.deepEqual(consoleErrors, []);
});
