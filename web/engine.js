// The engines of this node: polled from /v1/engines every 2 s while the page
// is open (history kept for the memory charts), shown by the engine panel.
import { auth, getJson } from './api.js';
import { h, fill, fmtInt, fmtBytes, fmtDuration, fmtPct, isNum } from './dom.js';

const POLL_MS = 2000;
const MAX_HISTORY = 1800; // one hour at 2 s

const history = []; // [{t, engines, node}]
const listeners = new Set();
let latest = null; // {t, engines, node, supported, models, error}
let timer = null;
let models = null;

export function engineHistory() {
  return history;
}

// Calls fn(latest) now (when known) and on each poll; returns the unsubscriber.
export function onEngines(fn) {
  listeners.add(fn);
  if (latest) fn(latest);
  return () => listeners.delete(fn);
}

function notify() {
  for (const fn of listeners) {
    try {
      fn(latest);
    } catch (e) {
      console.warn('engine listener failed', e);
    }
  }
}

async function poll() {
  timer = null;
  if (!auth.needed && !document.hidden) {
    const t = Date.now() / 1000;
    try {
      const r = await getJson('/v1/engines');
      latest = { t, engines: Array.isArray(r.data) ? r.data : [], node: r.node || null, supported: true };
      history.push({ t, engines: latest.engines, node: latest.node });
      if (history.length > MAX_HISTORY) history.splice(0, history.length - MAX_HISTORY);
    } catch (e) {
      if (e.status === 404) {
        // A server without /v1/engines: name its models at least.
        try {
          if (!models) models = ((await getJson('/v1/models')).data || []).map((m) => m.id);
        } catch {}
        latest = { t, engines: [], node: null, supported: false, models: models || [] };
      } else if (e.status !== 401) {
        latest = { ...(latest || { engines: [], node: null, supported: true }), error: e.message };
      }
    }
    if (latest) notify();
  }
  schedule();
}

function schedule() {
  if (!timer) timer = setTimeout(poll, POLL_MS);
}

export function startEngines() {
  if (timer) clearTimeout(timer);
  timer = null;
  poll();
}

function meter(used, total, label) {
  const frac = isNum(used) && isNum(total) && total > 0 ? used / total : null;
  return h('div', { class: 'meter' },
    h('div', { class: 'meter-bar' }, h('div', {
      class: ['meter-fill', frac !== null && frac > 0.9 && 'meter-high'],
      style: { width: `${frac === null ? 0 : Math.min(100, frac * 100)}%` },
    })),
    h('div', { class: 'meter-label' }, label));
}

function kv(label, value, cls) {
  return h('div', { class: ['kv', cls] }, h('dt', {}, label), h('dd', {}, value));
}

function engineCard(e) {
  const cells = isNum(e.kv_cells) ? e.kv_cells : null;
  const used = isNum(e.kv_cells_used) ? e.kv_cells_used : null;
  const memTotal = e.device_memory_total;
  return h('div', { class: 'engine-card', 'data-engine': e.index },
    h('div', { class: 'engine-head' },
      h('span', { class: 'engine-model', title: 'model' }, e.model || '(no model)'),
      h('span', { class: 'chip' }, e.device || 'device ?'),
      isNum(e.index) ? h('span', { class: 'muted small' }, `engine ${e.index}`) : null),
    h('div', { class: 'engine-meters' },
      h('div', { class: 'engine-kv' },
        h('div', { class: 'meter-title' }, 'KV cells'),
        meter(used, cells,
          `${fmtInt(used)} / ${fmtInt(cells)} used (${fmtPct(cells ? used / cells : null)})` +
          (isNum(e.kv_cells_reserved) ? ` · ${fmtInt(e.kv_cells_reserved)} reserved` : '') +
          (isNum(e.kv_cells_peak) ? ` · peak ${fmtInt(e.kv_cells_peak)}` : '') +
          (isNum(e.kv_bytes) ? ` · ${fmtBytes(e.kv_bytes)}` : ''))),
      isNum(memTotal) && memTotal > 0
        ? h('div', { class: 'engine-mem' },
          h('div', { class: 'meter-title' }, 'Device memory'),
          meter(e.device_memory_used, memTotal,
            `${fmtBytes(e.device_memory_used)} / ${fmtBytes(memTotal)}`))
        : null),
    h('dl', { class: 'kv-grid' },
      kv('Running', fmtInt(e.running), 'engine-running'),
      kv('Waiting', fmtInt(e.waiting), 'engine-waiting'),
      kv('Max sequences', fmtInt(e.max_seqs)),
      kv('Prefix anchors', fmtInt(e.anchors)),
      kv('Requests done', `${fmtInt(e.requests_done)}${e.requests_failed ? ` (${fmtInt(e.requests_failed)} failed)` : ''}`),
      kv('Prompt tokens', `${fmtInt(e.prompt_tokens)}${isNum(e.cached_tokens) ? ` (${fmtInt(e.cached_tokens)} cached)` : ''}`),
      kv('Generated tokens', fmtInt(e.generation_tokens)),
      kv('Steps', fmtInt(e.steps))));
}

function render(el, st) {
  if (!st) return fill(el, h('h2', {}, 'Engine'), h('p', { class: 'muted' }, 'Loading…'));
  const body = [];
  if (!st.supported) {
    body.push(h('p', { class: 'muted' },
      st.models && st.models.length ? `Model: ${st.models.join(', ')}. ` : '',
      'This server does not report engine statistics (/v1/engines).'));
  } else if (!st.engines.length) {
    body.push(h('p', { class: 'muted' }, 'API-only node: no model is loaded here; batches run on workers.'));
  } else {
    body.push(h('div', { class: 'engine-cards' }, st.engines.map(engineCard)));
  }
  if (st.node) {
    body.push(h('div', { class: 'node-line muted small' },
      `Process memory ${fmtBytes(st.node.rss_bytes)} · up ${fmtDuration(st.node.uptime_seconds)} · ` +
      `${fmtInt(st.node.online_requests)} online request${st.node.online_requests === 1 ? '' : 's'}`));
  }
  if (st.error) body.push(h('p', { class: 'error-text small' }, st.error));
  return fill(el, h('h2', {}, st.engines.length > 1 ? 'Engines' : 'Engine'), body);
}

// Renders the live engine panel into `el`; returns the unmounter.
export function mountEnginePanel(el) {
  el.classList.add('panel', 'engine-panel');
  el.id = el.id || 'engine-panel';
  render(el, latest);
  return onEngines((st) => render(el, st));
}

// Sums over engines of one history entry.
export function totals(entry) {
  const sum = (k) => entry.engines.reduce((a, e) => a + (isNum(e[k]) ? e[k] : 0), 0);
  return {
    kvUsed: sum('kv_cells_used'),
    kvCells: sum('kv_cells'),
    kvReserved: sum('kv_cells_reserved'),
    devUsed: sum('device_memory_used'),
    devTotal: sum('device_memory_total'),
    rss: entry.node && isNum(entry.node.rss_bytes) ? entry.node.rss_bytes : null,
    running: sum('running'),
    waiting: sum('waiting'),
  };
}
