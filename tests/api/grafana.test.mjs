// The monitoring deliverables against a real node: grafana/kvbatch.json is an
// importable dashboard whose every PromQL expression parses and names only
// series that `kvbatch serve` exports on GET /metrics (scraped with the API
// key while a batch runs and after it ends), the scrape passes
// `promtool check metrics`, and docs/monitoring.md lists every series.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as h from './helpers.mjs';

const repo = (p) => fileURLToPath(new URL(`../../${p}`, import.meta.url));
const DASHBOARD_PATH = repo('grafana/kvbatch.json');
const METRICS_CC = repo('src/metrics/metrics.cc');
const DOC_PATH = repo('docs/monitoring.md');
const DS = '${DS_PROMETHEUS}';
const KEY = 'grafana-test-key';

const dashboard = JSON.parse(fs.readFileSync(DASHBOARD_PATH, 'utf8'));

// Every series the node can export, from the source: name -> type.
function declaredFamilies() {
  const src = fs.readFileSync(METRICS_CC, 'utf8');
  const out = new Map();
  for (const m of src.matchAll(/Build<(Gauge|Counter|Histogram)>\(\s*r,\s*"(kvbatch_[a-z0-9_]+)"/g))
    out.set(m[2], m[1].toLowerCase());
  return out;
}
const DECLARED = declaredFamilies();
// NVML's series exist only where libnvidia-ml.so.1 loads.
const isNvml = (name) => name.startsWith('kvbatch_gpu_');

// Panels, rows' nested panels included.
function allPanels(d) {
  const out = [];
  for (const p of d.panels || []) {
    out.push(p);
    for (const q of p.panels || []) out.push(q);
  }
  return out;
}
const isRow = (p) => p.type === 'row';

// Metric names an expression selects: string literals, label matchers,
// ranges and label lists removed, what is left that is not a function call,
// a keyword or part of a number is a metric name.
const KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or',
  'unless', 'offset', 'inf', 'nan']);
function metricNames(expr) {
  let e = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/'(?:[^'\\]|\\.)*'/g, "''");
  e = e.replace(/\{[^}]*\}/g, ' ').replace(/\[[^\]]*\]/g, ' ');
  e = e.replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  const names = new Set();
  for (const m of e.matchAll(/(?<![\w.])[A-Za-z_:][\w:]*/g)) {
    const rest = e.slice(m.index + m[0].length).trimStart();
    if (rest.startsWith('(') || KEYWORDS.has(m[0].toLowerCase())) continue;
    names.add(m[0]);
  }
  return names;
}

// [where, expr] for every query of the dashboard, template variables too.
function queries(d) {
  const out = [];
  for (const p of allPanels(d)) for (const t of p.targets || []) if (t.expr) out.push([`panel ${p.id} "${p.title}" ${t.refId}`, t.expr]);
  return out;
}
function variableQueries(d) {
  return (d.templating?.list || []).filter((v) => v.type === 'query')
    .map((v) => [v.name, typeof v.query === 'string' ? v.query : v.query.query]);
}
// label_values(metric{...}, label) -> metric
function variableMetric(q) {
  const m = /^label_values\(\s*([A-Za-z_:][\w:]*)/.exec(q);
  return m ? m[1] : null;
}

// The family a series name belongs to (histograms: _bucket/_sum/_count).
function familyOf(name, types) {
  if (types.has(name)) return name;
  const m = /^(.*)_(bucket|sum|count)$/.exec(name);
  if (m && types.get(m[1]) === 'histogram') return m[1];
  return null;
}

function usedNames() {
  const names = new Map();  // name -> where
  for (const [where, expr] of queries(dashboard))
    for (const n of metricNames(expr)) if (!names.has(n)) names.set(n, where);
  for (const [where, q] of variableQueries(dashboard)) {
    const n = variableMetric(q);
    if (n && !names.has(n)) names.set(n, `variable ${where}`);
  }
  return names;
}

// The text format: TYPE lines and samples.
function parseExposition(text) {
  const types = new Map();
  const samples = [];
  for (const line of text.split('\n')) {
    if (line.startsWith('# TYPE ')) {
      const [, , name, type] = line.split(' ');
      types.set(name, type);
      continue;
    }
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    assert.ok(m, `unparsable sample line: ${line}`);
    const labels = {};
    for (const l of (m[2] || '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return { types, samples };
}
function value(scrape, name, labels = {}) {
  const s = scrape.samples.find((x) => x.name === name && Object.entries(labels).every(([k, v]) => x.labels[k] === v));
  return s ? s.value : undefined;
}

function promtoolAvailable() {
  const r = spawnSync('promtool', ['--version'], { encoding: 'utf8' });
  return !r.error && r.status === 0;
}
function promtool(args, input) {
  return spawnSync('promtool', args, { input, encoding: 'utf8', timeout: 30000 });
}

let work;
before(async () => {
  work = await h.makeWorkDir('kvbatch-grafana-');
});
after(() => h.removeDir(work && work.dir));

test('grafana/kvbatch.json is an importable dashboard', () => {
  assert.equal(typeof dashboard.title, 'string');
  assert.equal(typeof dashboard.uid, 'string');
  assert.ok(dashboard.schemaVersion >= 36, `schemaVersion ${dashboard.schemaVersion}`);
  assert.equal(dashboard.id, null, 'an exported dashboard carries no instance id');
  const input = (dashboard.__inputs || []).find((i) => i.name === 'DS_PROMETHEUS');
  assert.ok(input, '__inputs lacks DS_PROMETHEUS');
  assert.equal(input.type, 'datasource');
  assert.equal(input.pluginId, 'prometheus');

  // No hard-wired data source anywhere: every prometheus reference is the input.
  const walk = (v, at) => {
    if (Array.isArray(v)) return v.forEach((x, i) => walk(x, `${at}[${i}]`));
    if (v === null || typeof v !== 'object') return;
    if (v.type === 'prometheus' && 'uid' in v) assert.equal(v.uid, DS, `${at} names data source ${v.uid}`);
    for (const [k, x] of Object.entries(v)) walk(x, `${at}.${k}`);
  };
  walk(dashboard, '$');

  const panels = allPanels(dashboard);
  assert.ok(panels.filter((p) => !isRow(p)).length >= 20, 'too few panels');
  const ids = panels.map((p) => p.id);
  assert.ok(ids.every(Number.isInteger), 'panel ids are integers');
  assert.equal(new Set(ids).size, ids.length, `duplicate panel ids: ${ids}`);
  const boxes = [];
  for (const p of panels) {
    const g = p.gridPos;
    assert.ok(g && ['h', 'w', 'x', 'y'].every((k) => Number.isInteger(g[k]) && g[k] >= 0), `panel ${p.id} gridPos`);
    assert.ok(g.w > 0 && g.h > 0 && g.x + g.w <= 24, `panel ${p.id} is off the grid: ${JSON.stringify(g)}`);
    for (const [q, b] of boxes) {
      const overlap = g.x < b.x + b.w && b.x < g.x + g.w && g.y < b.y + b.h && b.y < g.y + g.h;
      assert.ok(!overlap, `panels ${q} and ${p.id} overlap`);
    }
    boxes.push([p.id, g]);
    assert.equal(typeof p.title, 'string');
    if (isRow(p)) continue;
    assert.deepEqual(p.datasource, { type: 'prometheus', uid: DS }, `panel ${p.id} "${p.title}" datasource`);
    assert.ok(Array.isArray(p.targets) && p.targets.length > 0, `panel ${p.id} has no queries`);
    const refs = new Set();
    for (const t of p.targets) {
      assert.ok(typeof t.expr === 'string' && t.expr.trim() !== '', `panel ${p.id} has a query without expr`);
      assert.ok(!refs.has(t.refId), `panel ${p.id} repeats refId ${t.refId}`);
      refs.add(t.refId);
      if (t.datasource) assert.equal(t.datasource.uid, DS, `panel ${p.id} ${t.refId} datasource`);
    }
  }

  const vars = new Map((dashboard.templating?.list || []).map((v) => [v.name, v]));
  for (const name of ['instance', 'engine']) {
    const v = vars.get(name);
    assert.ok(v, `no template variable ${name}`);
    assert.equal(v.type, 'query');
    assert.equal(v.datasource?.uid, DS);
  }
  // Only variables that exist (and Grafana's own) are used.
  for (const [where, expr] of queries(dashboard))
    for (const m of expr.matchAll(/\$(\w+)/g))
      assert.ok(vars.has(m[1]) || m[1].startsWith('__'), `${where} uses undefined variable $${m[1]}`);
});

test('the dashboard uses only series declared in src/metrics, and all of them', () => {
  const used = usedNames();
  assert.ok(used.size >= 20, `only ${used.size} metric names found`);
  for (const [name, where] of used) {
    assert.match(name, /^kvbatch_/, `${where} uses ${name}, not a kvbatch series`);
    assert.ok(familyOf(name, DECLARED), `${where} uses ${name}, which src/metrics/metrics.cc does not declare`);
  }
  // Counters and histogram parts are rated; gauges are not.
  for (const [where, expr] of queries(dashboard)) {
    for (const m of expr.matchAll(/\b(rate|irate|increase)\(\s*([A-Za-z_:][\w:]*)/g)) {
      const fam = familyOf(m[2], DECLARED);
      const ok = DECLARED.get(m[2]) === 'counter' || (fam !== m[2] && DECLARED.get(fam) === 'histogram');
      assert.ok(ok, `${where}: ${m[1]}() of ${m[2]}, a ${DECLARED.get(fam) || 'unknown series'}`);
    }
    for (const m of expr.matchAll(/histogram_quantile\([^,]+,[^)]*?\(\s*rate\(\s*([A-Za-z_:][\w:]*)/g))
      assert.match(m[1], /_bucket$/, `${where}: histogram_quantile over ${m[1]}`);
  }
  const families = new Set([...used.keys()].map((n) => familyOf(n, DECLARED)));
  const missing = [...DECLARED.keys()].filter((n) => !families.has(n));
  assert.deepEqual(missing, [], 'series with no panel in grafana/kvbatch.json');
});

test('every dashboard expression is valid PromQL (promtool check rules)', (t) => {
  if (!promtoolAvailable()) {
    t.skip('promtool is not installed (Debian package prometheus): PromQL not checked');
    return;
  }
  // As recording rules, with Grafana's variables replaced.
  const sub = (e) => e.replaceAll('$instance', '.+').replaceAll('$engine', '.+')
    .replaceAll('$__rate_interval', '1m').replaceAll('$__range', '1h');
  const rules = queries(dashboard).map(([, expr], i) =>
    `      - record: kvbatch_dashboard:q${i}\n        expr: ${JSON.stringify(sub(expr))}\n`);
  const file = path.join(work.dir, 'dashboard-rules.yml');
  fs.writeFileSync(file, `groups:\n  - name: dashboard\n    rules:\n${rules.join('')}`);
  const r = promtool(['check', 'rules', file]);
  assert.equal(r.status, 0, `promtool check rules:\n${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, new RegExp(`SUCCESS: ${rules.length} rules found`));
});

test('docs/monitoring.md lists every series', () => {
  const doc = fs.readFileSync(DOC_PATH, 'utf8');
  const missing = [...DECLARED.keys()].filter((n) => !doc.includes(`\`${n}\``));
  assert.deepEqual(missing, [], 'series not described in docs/monitoring.md');
  assert.ok(doc.includes('grafana/kvbatch.json'));
});

test('a live server exports every series the dashboard uses', async (t) => {
  const started = Date.now();
  const s = await h.startServer({
    model: work.model, dataDir: path.join(work.dir, 'data'), maxSeqs: 4, defaultMaxTokens: 16,
    extraArgs: ['--api-key', KEY],
  });
  const kvCells = Number(/(\d+) KV cells/.exec(s.stdout())[1]);
  const scrapeText = async () => {
    const r = await h.httpCall(s.port, 'GET', '/metrics', { headers: { Authorization: `Bearer ${KEY}` } });
    assert.equal(r.status, 200, r.text);
    assert.match(r.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
    return r.text;
  };
  const texts = [];
  let stopped;
  try {
    // With --api-key, /metrics wants it too.
    assert.equal((await h.httpCall(s.port, 'GET', '/metrics')).status, 401);
    assert.equal((await h.httpCall(s.port, 'GET', '/metrics', { headers: { Authorization: 'Bearer wrong' } })).status, 401);

    // Short answers, one long one (so the batch is seen running) and one
    // line that fails (an error code to count).
    const rows = [
      ...h.chatRows(6, { body: { max_tokens: 8 } }),
      h.chatLine('long', 'Tell me everything about parcel 42.', { max_tokens: 600 }),
      h.chatLine('bad-schema', 'Answer in JSON.', {
        max_tokens: 8, response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'bogus' } } },
      }),
    ];
    const client = s.client(KEY);
    const file = await h.uploadFile(client, h.makeInputFile(work.dir, 'in.jsonl', rows));
    const batch = await client.batches.create({
      input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h',
    });

    // While it runs (validated: its lines counted): its kvbatch_batch_* series.
    const counted = (x) => ['completed', 'failed', 'pending']
      .reduce((n, state) => n + (value(x, 'kvbatch_batch_requests', { batch_id: batch.id, state }) ?? 0), 0);
    let running = null;
    let live = null;
    const deadline = Date.now() + 30000;
    while (!running && Date.now() < deadline) {
      const text = await scrapeText();
      const x = parseExposition(text);
      if (counted(x) === rows.length) {
        running = text;
        live = x;
      } else if (['completed', 'failed'].includes((await client.batches.retrieve(batch.id)).status)) {
        break;
      } else {
        await h.sleep(50);
      }
    }
    assert.ok(running, 'the batch ended (or 30 s passed) before a scrape showed its kvbatch_batch_* series');
    texts.push(running);
    assert.ok(value(live, 'kvbatch_batch_requests_per_second', { batch_id: batch.id }) >= 0);
    assert.ok(value(live, 'kvbatch_batch_eta_seconds', { batch_id: batch.id }) >= -1);
    assert.equal(value(live, 'kvbatch_batches_active', { status: 'in_progress' }) +
      value(live, 'kvbatch_batches_active', { status: 'validating' }) +
      value(live, 'kvbatch_batches_active', { status: 'finalizing' }), 1);

    const done = await h.waitForBatch(client, batch.id, ['completed', 'failed', 'expired', 'cancelled'], 60000);
    assert.equal(done.status, 'completed');
    assert.deepEqual(done.request_counts, { total: rows.length, completed: rows.length - 1, failed: 1 });

    const final = await scrapeText();
    texts.push(final);
    const end = parseExposition(final);
    // Values that make sense for what ran.
    assert.equal(value(end, 'kvbatch_kv_cells_total', { engine: '0' }), kvCells);
    assert.equal(value(end, 'kvbatch_max_sequences', { engine: '0' }), 4);
    assert.equal(value(end, 'kvbatch_engine_info', { engine: '0', model: 'tiny', device: 'CPU' }), 1);
    assert.equal(value(end, 'kvbatch_results_total', { event: 'committed' }), rows.length);
    assert.equal(value(end, 'kvbatch_results_total', { event: 'dropped' }), 0);
    assert.ok(value(end, 'kvbatch_chunks_total', { event: 'claimed' }) >= 1);
    assert.equal(value(end, 'kvbatch_chunks_total', { event: 'lost' }), 0);
    assert.equal(value(end, 'kvbatch_request_errors_total', { code: 'invalid_request' }), 1);
    assert.equal(value(end, 'kvbatch_engine_requests_total', { engine: '0', result: 'ok' }), rows.length - 1);
    const prompt = value(end, 'kvbatch_prompt_tokens_total', { engine: '0' });
    const cached = value(end, 'kvbatch_prompt_tokens_cached_total', { engine: '0' });
    assert.ok(prompt > 0 && cached > 0 && cached <= prompt, `prompt ${prompt}, cached ${cached}`);
    assert.ok(value(end, 'kvbatch_generation_tokens_total', { engine: '0' }) >= rows.length - 1);
    assert.equal(value(end, 'kvbatch_request_duration_seconds_count', { engine: '0' }),
      value(end, 'kvbatch_time_to_first_token_seconds_count', { engine: '0' }));
    assert.equal(value(end, 'kvbatch_decode_step_seconds_count', { engine: '0' }),
      value(end, 'kvbatch_decode_steps_total', { engine: '0' }));
    assert.equal(value(end, 'kvbatch_requests_running', { engine: '0' }), 0);
    const used = value(end, 'kvbatch_device_memory_used_bytes', { engine: '0' });
    const total = value(end, 'kvbatch_device_memory_total_bytes', { engine: '0' });
    assert.ok(used > 0 && used <= total, `device memory ${used} of ${total}`);
    assert.ok(value(end, 'kvbatch_process_resident_memory_bytes') > 1 << 20);
    assert.ok(value(end, 'kvbatch_uptime_seconds') > 0);
    assert.ok(value(end, 'kvbatch_http_responses_total', { code: '200' }) > 0);
    assert.ok(value(end, 'kvbatch_http_responses_total', { code: '401' }) >= 2);
    // An ended batch leaves: the series stay bounded by the active batches.
    assert.equal(value(end, 'kvbatch_batch_requests', { batch_id: batch.id }), undefined);
    assert.equal(value(end, 'kvbatch_batches_active', { status: 'in_progress' }), 0);
  } finally {
    stopped = await h.stopServer(s);
  }
  assert.equal(stopped.code, 0, s.stderr());

  // Every series the dashboard uses, in one of the two scrapes.
  const scrapes = texts.map(parseExposition);
  const types = new Map(scrapes.flatMap((x) => [...x.types]));
  const sampled = new Set(scrapes.flatMap((x) => x.samples.map((y) => y.name)));
  const absent = [];
  for (const [name, where] of usedNames()) {
    const fam = familyOf(name, types);
    const ok = fam && sampled.has(fam === name ? name : (types.get(fam) === 'histogram' ? `${fam}_bucket` : fam));
    if (ok) {
      assert.equal(types.get(fam), DECLARED.get(fam), `${fam}: exported as ${types.get(fam)}`);
      continue;
    }
    if (isNvml(name)) {
      assert.ok(familyOf(name, DECLARED), `${name} (${where}) is not declared in src/metrics/metrics.cc`);
      continue;
    }
    absent.push(`${name} (${where})`);
  }
  assert.deepEqual(absent, [], 'dashboard series missing from /metrics');

  if (!promtoolAvailable()) {
    t.diagnostic('promtool is not installed (Debian package prometheus): the scrape is not linted');
  } else {
    for (const text of texts) {
      const r = promtool(['check', 'metrics'], text);
      assert.equal(r.status, 0, `promtool check metrics:\n${r.stdout}\n${r.stderr}`);
    }
  }
  t.diagnostic(`live check took ${Date.now() - started} ms`);
});
