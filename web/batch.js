// One batch: live status from its event stream, throughput and memory
// charts, controls (pause, resume, cancel, priority), files and errors.
import {
  auth, getJson, post, postJson, streamEvents, downloadFile, fileHead,
} from './api.js';
import {
  h, fill, fmtInt, fmtPct, fmtRate, fmtDuration, fmtTime, fmtBytes, statusBadge, progressBar, isNum,
  averageRates, answeredCount, TERMINAL, toast, sleep,
} from './dom.js';
import { lineChart } from './chart.js';
import { engineHistory, mountEnginePanel, onEngines, totals } from './engine.js';

const MAX_POINTS = 3600;
const CHART_WINDOW_S = 600;
const MAX_ERROR_ROWS = 500;
const COLORS = { blue: '#2563eb', teal: '#0d9488', violet: '#7c3aed', amber: '#d97706', gray: '#94a3b8' };

// Per-batch samples seen by this page (event stream and list polling):
// id -> [{t, rps, tps, done}]
const histories = new Map();

export function recordBatch(b) {
  if (!b || !b.id) return;
  let hist = histories.get(b.id);
  if (!hist) histories.set(b.id, (hist = []));
  const x = b.kvbatch || {};
  const c = b.request_counts || {};
  const running = b.status === 'in_progress' && !x.paused;
  const t = Date.now() / 1000;
  const sample = {
    t,
    rps: isNum(x.requests_per_second) ? x.requests_per_second : running ? 0 : null,
    tps: isNum(x.tokens_per_second) ? x.tokens_per_second : running ? 0 : null,
    done: (c.completed || 0) + (c.failed || 0),
  };
  const last = hist[hist.length - 1];
  if (last && t - last.t < 0.5) hist[hist.length - 1] = sample;
  else hist.push(sample);
  if (hist.length > MAX_POINTS) hist.splice(0, hist.length - MAX_POINTS);
}

function lineError(line) {
  const r = line.response || {};
  const e = (r.body && r.body.error) || line.error || {};
  return {
    customId: line.custom_id ?? '',
    status: r.status_code ?? null,
    code: e.code || e.type || '',
    message: e.message || (typeof line.error === 'string' ? line.error : ''),
  };
}

function tile(label, value, { id, sub } = {}) {
  return h('div', { class: 'tile', id }, h('div', { class: 'tile-label' }, label),
    h('div', { class: 'tile-value' }, value), sub ? h('div', { class: 'tile-sub muted small' }, sub) : null);
}

export function mountBatch(root, id) {
  const ac = new AbortController();
  let stopped = false;
  let batch = null;
  let mode = 'connecting'; // live | polling | connecting | ended
  let errorFile = { id: null, key: null, rows: null, total: 0, error: '' };
  // Parts with buttons or links are rebuilt only when what they show changes:
  // a button replaced between mousedown and mouseup would lose the click.
  const shown = {};
  const changed = (part, ...what) => {
    const sig = JSON.stringify(what);
    if (shown[part] === sig) return false;
    shown[part] = sig;
    return true;
  };
  let confirmCancel = false;
  let busy = false;
  let priorityTouched = false;

  const el = {
    head: h('div', { class: 'batch-head' }),
    controls: h('div', { class: 'panel controls', id: 'batch-controls' }),
    progress: h('div', { class: 'panel batch-progress-panel' }),
    charts: h('div', { class: 'charts', id: 'batch-charts' }),
    files: h('div', { class: 'panel files', id: 'batch-files' }),
    details: h('div', { class: 'panel details' }),
    errors: h('div', { class: 'panel errors-panel', id: 'batch-errors' }),
    engine: h('section', { id: 'engine-panel' }),
  };
  const priorityInput = h('input', {
    type: 'number', id: 'priority-input', min: '-1000', max: '1000', step: '1', 'aria-label': 'Priority',
    oninput: () => { priorityTouched = true; },
  });

  fill(root, h('div', { class: 'batch-view', id: 'batch-view', 'data-batch-id': id },
    h('a', { href: '#/', class: 'back-link' }, '← All batches'),
    el.head,
    h('div', { class: 'batch-grid' },
      h('div', { class: 'batch-main' }, el.progress, el.charts, el.errors),
      h('div', { class: 'batch-side' }, el.controls, el.files, el.details, el.engine))));
  const unmountEngine = mountEnginePanel(el.engine);
  const unEngines = onEngines(() => renderCharts());

  async function act(label, fn) {
    if (busy) return;
    busy = true;
    renderControls();
    try {
      const b = await fn();
      if (b && b.id) update(b);
      toast(label);
    } catch (e) {
      toast(e.message, 'error');
    } finally {
      busy = false;
      renderControls();
    }
  }

  const path = `/v1/batches/${encodeURIComponent(id)}`;
  const pause = () => act('Batch paused', () => post(`${path}/pause`));
  const resume = () => act('Batch resumed', () => post(`${path}/resume`));
  const cancel = () => {
    confirmCancel = false;
    act('Cancelling the batch', () => post(`${path}/cancel`));
  };
  const setPriority = (ev) => {
    ev.preventDefault();
    const v = priorityInput.value.trim();
    if (!/^-?\d+$/.test(v) || Math.abs(Number(v)) > 1000) {
      toast('Priority must be an integer from -1000 to 1000.', 'error');
      return;
    }
    act(`Priority set to ${Number(v)}`, async () => {
      const b = await postJson(`${path}/priority`, { priority: Number(v) });
      priorityTouched = false;
      return b;
    });
  };

  const priorityButton = h('button', { class: 'btn', id: 'btn-priority', type: 'submit' }, 'Set');
  const priorityForm = h('form', { class: 'priority-form', onsubmit: setPriority },
    h('label', { class: 'field' }, h('span', { class: 'field-label' }, 'Priority (−1000…1000, higher runs first)'),
      h('div', { class: 'inline' }, priorityInput, priorityButton)));

  function renderHead() {
    if (!batch) return;
    const x = batch.kvbatch || {};
    if (!changed('head', batch.status, Boolean(x.paused), mode)) return;
    fill(el.head,
      h('div', { class: 'batch-title' },
        h('h1', { class: 'mono' }, batch.id),
        statusBadge(batch.status, { id: 'batch-status' }),
        x.paused && !TERMINAL.has(batch.status) ? h('span', { class: 'badge badge-paused', id: 'batch-paused' }, 'paused') : null,
        h('span', { class: ['live', `live-${mode}`], id: 'batch-live', title: 'updates' },
          mode === 'live' ? 'live' : mode === 'polling' ? 'polling' : mode === 'ended' ? 'final' : 'connecting…')),
      h('div', { class: 'muted small' },
        `${batch.endpoint} · created ${fmtTime(batch.created_at)} · window ${batch.completion_window}`));
  }

  function renderControls() {
    if (!batch) return;
    const x = batch.kvbatch || {};
    const active = batch.status === 'validating' || batch.status === 'in_progress';
    const terminal = TERMINAL.has(batch.status);
    if (!priorityTouched && document.activeElement !== priorityInput) priorityInput.value = isNum(x.priority) ? String(x.priority) : '0';
    priorityInput.disabled = terminal;
    priorityButton.disabled = terminal || busy;
    if (!changed('controls', batch.status, Boolean(x.paused), busy, confirmCancel)) return;
    const buttons = [];
    if (active && !x.paused) buttons.push(h('button', { class: 'btn', id: 'btn-pause', onclick: pause, disabled: busy }, 'Pause'));
    if (x.paused && !terminal) buttons.push(h('button', { class: 'btn btn-primary', id: 'btn-resume', onclick: resume, disabled: busy }, 'Resume'));
    if (active && !confirmCancel) {
      buttons.push(h('button', {
        class: 'btn btn-danger-outline', id: 'btn-cancel', disabled: busy,
        onclick: () => { confirmCancel = true; renderControls(); },
      }, 'Cancel batch'));
    }
    // The priority form stays in place (it may have the focus); the rest is rebuilt.
    fill(el.controls, h('h2', {}, 'Controls'),
      terminal ? h('p', { class: 'muted small' }, `This batch is ${batch.status}; it can no longer be changed.`) : null,
      buttons.length ? h('div', { class: 'btn-row' }, buttons) : null,
      active && confirmCancel ? h('div', { class: 'confirm', role: 'alertdialog', 'aria-label': 'Confirm cancel' },
        h('p', {}, 'Cancel this batch? Requests not yet answered are dropped; answers so far stay in the output file.'),
        h('div', { class: 'btn-row' },
          h('button', { class: 'btn btn-danger', id: 'btn-cancel-confirm', onclick: cancel, disabled: busy }, 'Yes, cancel batch'),
          h('button', { class: 'btn', id: 'btn-cancel-keep', onclick: () => { confirmCancel = false; renderControls(); } }, 'Keep running'))) : null,
      priorityForm);
  }

  function renderProgress() {
    if (!batch) return;
    const x = batch.kvbatch || {};
    const c = batch.request_counts || {};
    const u = batch.usage || {};
    const done = (c.completed || 0) + (c.failed || 0);
    // A cancelled or expired batch counts what never ran as failed: its bar shows what ran.
    const stopped = (batch.status === 'cancelled' || batch.status === 'expired') && c.total > 0;
    const frac = stopped ? answeredCount(batch, true) / c.total : isNum(x.progress) ? x.progress : (c.total ? done / c.total : null);
    const running = batch.status === 'in_progress' && !x.paused;
    const terminal = TERMINAL.has(batch.status);
    const avg = terminal ? averageRates(batch) : { rps: null, tps: null };
    const rate = (live, a) => (running ? fmtRate(live) : isNum(a) ? fmtRate(a) : '—');
    const avgSub = terminal && isNum(avg.rps) ? 'average over the run' : null;
    fill(el.progress,
      h('div', { class: 'panel-head' }, h('h2', {}, 'Progress'),
        h('span', { class: 'muted small', id: 'batch-counts' },
          `${fmtInt(done)} of ${fmtInt(c.total)} requests answered · ${fmtInt(c.completed)} ok · ${fmtInt(c.failed)} failed`)),
      progressBar(frac, {
        id: 'batch-progress', busy: !terminal, label: isNum(frac) ? `${(Math.floor(frac * 1000) / 10).toFixed(1)}%` : '—',
      }),
      h('div', { class: 'tiles' },
        tile('Requests/s', rate(x.requests_per_second, avg.rps), { id: 'tile-rps', sub: avgSub }),
        tile('Tokens/s', rate(x.tokens_per_second, avg.tps), { id: 'tile-tps', sub: avgSub }),
        tile('ETA', running ? fmtDuration(x.eta_seconds) : batch.status === 'completed' ? 'done'
          : x.paused && !terminal ? 'paused' : '—', { id: 'tile-eta' }),
        tile('Prefix-cache hit', fmtPct(x.prefix_cache_hit_rate), { sub: `${fmtInt(u.input_tokens_details && u.input_tokens_details.cached_tokens)} of ${fmtInt(u.input_tokens)} prompt tokens` }),
        tile('In flight', fmtInt(x.in_flight)),
        tile('Output tokens', fmtInt(u.output_tokens), { sub: `${fmtInt(u.total_tokens)} total` })));
  }

  function renderCharts() {
    if (stopped) return;
    const now = Date.now() / 1000;
    const from = now - CHART_WINDOW_S;
    const hist = (histories.get(id) || []).filter((p) => p.t >= from);
    const eng = engineHistory().filter((p) => p.t >= from);
    const tot = eng.map((p) => ({ t: p.t, ...totals(p) }));
    const last = tot[tot.length - 1];
    const empty = batch && TERMINAL.has(batch.status)
      ? 'Throughput is sampled while the batch runs and this page is open.' : undefined;
    const charts = [
      lineChart({
        title: 'Requests / s', id: 'chart-rps', empty,
        series: [{ label: 'requests/s', color: COLORS.blue, points: hist.map((p) => [p.t, p.rps]) }],
      }),
      lineChart({
        title: 'Tokens / s', id: 'chart-tps', empty,
        series: [{ label: 'tokens/s', color: COLORS.teal, points: hist.map((p) => [p.t, p.tps]) }],
      }),
      lineChart({
        title: 'KV cache cells',
        id: 'chart-kv',
        note: last ? `of ${fmtInt(last.kvCells)}` : '',
        series: [
          { label: 'used', color: COLORS.violet, points: tot.map((p) => [p.t, p.kvUsed]) },
          { label: 'reserved', color: COLORS.gray, points: tot.map((p) => [p.t, p.kvReserved]) },
        ],
      }),
    ];
    const mem = [];
    if (last && last.devTotal > 0) mem.push({ label: 'device', color: COLORS.amber, points: tot.map((p) => [p.t, p.devUsed]) });
    mem.push({ label: 'process RSS', color: COLORS.blue, points: tot.map((p) => [p.t, p.rss]) });
    charts.push(lineChart({
      title: 'Memory', id: 'chart-mem', format: fmtBytes, bytes: true, series: mem,
      note: last && last.devTotal > 0 ? `device total ${fmtBytes(last.devTotal)}` : '',
    }));
    fill(el.charts, charts);
  }

  function fileRow(label, fileId, name, domId) {
    return h('div', { class: 'file-row' },
      h('div', {}, h('div', { class: 'file-label' }, label),
        h('div', { class: 'mono small muted' }, fileId || 'not yet')),
      h('button', {
        class: 'btn btn-small', id: domId, disabled: !fileId,
        onclick: async () => {
          try {
            await downloadFile(fileId, name);
          } catch (e) {
            toast(e.message, 'error');
          }
        },
      }, 'Download'));
  }

  function renderFiles() {
    if (!batch || !changed('files', batch.input_file_id, batch.output_file_id, batch.error_file_id)) return;
    fill(el.files, h('h2', {}, 'Files'),
      fileRow('Input', batch.input_file_id, `${batch.id}_input.jsonl`, 'download-input'),
      fileRow('Output', batch.output_file_id, `${batch.id}_output.jsonl`, 'download-output'),
      fileRow('Errors', batch.error_file_id, `${batch.id}_errors.jsonl`, 'download-error'));
  }

  function renderDetails() {
    if (!batch) return;
    const b = batch;
    const times = [
      ['Created', b.created_at], ['In progress', b.in_progress_at], ['Finalizing', b.finalizing_at],
      ['Completed', b.completed_at], ['Failed', b.failed_at], ['Cancelling', b.cancelling_at],
      ['Cancelled', b.cancelled_at], ['Expired', b.expired_at], ['Expires', b.expires_at],
    ].filter(([, t]) => isNum(t) && t > 0);
    const meta = b.metadata && typeof b.metadata === 'object' ? Object.entries(b.metadata) : [];
    if (!changed('details', times, meta)) return;
    fill(el.details, h('h2', {}, 'Details'),
      h('dl', { class: 'kv-list' },
        times.map(([k, t]) => [h('dt', {}, k), h('dd', {}, fmtTime(t))]),
        meta.length ? [h('dt', {}, 'Metadata'), h('dd', {}, meta.map(([k, v]) => h('div', { class: 'mono small' }, `${k}: ${v}`)))] : null));
  }

  function renderErrors() {
    if (!batch) return;
    const data = (batch.errors && batch.errors.data) || [];
    const failedNow = batch.request_counts ? batch.request_counts.failed : 0;
    if (!changed('errors', data.length, batch.error_file_id, failedNow, errorFile.key, Boolean(errorFile.rows), errorFile.error)) return;
    const parts = [h('h2', {}, 'Errors')];
    if (data.length) {
      parts.push(h('h3', {}, `Input file problems (${data.length})`),
        h('div', { class: 'table-wrap' }, h('table', { class: 'errors-table', id: 'input-errors' },
          h('thead', {}, h('tr', {}, h('th', { class: 'col-num' }, 'Line'), h('th', {}, 'Code'), h('th', {}, 'Param'), h('th', {}, 'Message'))),
          h('tbody', {}, data.map((e) => h('tr', { class: 'error-row' },
            h('td', { class: 'col-num mono' }, e.line ?? '—'), h('td', { class: 'mono' }, e.code || ''),
            h('td', { class: 'mono' }, e.param ?? ''), h('td', { class: 'msg' }, e.message || '')))))));
    }
    if (errorFile.rows) {
      const more = errorFile.truncated ? `: the first ${errorFile.rows.length} shown, download the file for all` : '';
      parts.push(h('h3', {}, `Failed requests (${errorFile.truncated ? 'about ' : ''}${fmtInt(errorFile.total)})${more}`),
        h('div', { class: 'table-wrap' }, h('table', { class: 'errors-table', id: 'request-errors' },
          h('thead', {}, h('tr', {}, h('th', {}, 'custom_id'), h('th', { class: 'col-num' }, 'Status'), h('th', {}, 'Code'), h('th', {}, 'Message'))),
          h('tbody', {}, errorFile.rows.map((r) => h('tr', { class: 'error-row' },
            h('td', { class: 'mono custom-id' }, r.customId), h('td', { class: 'col-num' }, r.status ?? '—'),
            h('td', { class: 'mono' }, r.code), h('td', { class: 'msg' }, r.message)))))));
    } else if (errorFile.error) {
      parts.push(h('p', { class: 'error-text small' }, `Cannot read the error file: ${errorFile.error}`));
    } else if (batch.error_file_id) {
      parts.push(h('p', { class: 'muted small' }, 'Loading the error file…'));
    }
    const failed = batch.request_counts ? batch.request_counts.failed : 0;
    if (!data.length && !batch.error_file_id) {
      parts.push(h('p', { class: 'muted small' }, failed
        ? `${fmtInt(failed)} request${failed === 1 ? '' : 's'} failed; the error file is written when the batch ends.`
        : 'No errors.'));
    }
    fill(el.errors, parts);
  }

  async function loadErrorFile() {
    const fid = batch.error_file_id;
    const key = `${fid}|${TERMINAL.has(batch.status)}`;
    if (!fid || errorFile.key === key) return;
    errorFile = { id: fid, key, rows: errorFile.id === fid ? errorFile.rows : null, total: errorFile.total, error: '' };
    try {
      const { lines, truncated } = await fileHead(fid, MAX_ERROR_ROWS, { signal: ac.signal });
      const rows = lines.map((l) => {
        try {
          return lineError(JSON.parse(l));
        } catch {
          return { customId: '', status: null, code: 'unparsable_line', message: l.slice(0, 200) };
        }
      });
      const failed = batch.request_counts ? batch.request_counts.failed : 0;
      const total = truncated ? Math.max(failed, rows.length + 1) : rows.length;
      if (errorFile.key === key) errorFile = { ...errorFile, rows, total, truncated };
    } catch (e) {
      if (e.name === 'AbortError') return;
      if (errorFile.key === key) errorFile = { ...errorFile, key: null, error: e.message };
    }
    if (!stopped) renderErrors();
  }

  function update(b) {
    if (stopped || !b || b.id !== id) return;
    batch = b;
    recordBatch(b);
    if (TERMINAL.has(b.status)) confirmCancel = false;
    renderHead();
    renderControls();
    renderProgress();
    renderCharts();
    renderFiles();
    renderDetails();
    renderErrors();
    loadErrorFile();
  }

  function setMode(m) {
    if (mode === m) return;
    mode = m;
    renderHead();
  }

  function showMissing(message) {
    fill(root, h('div', { class: 'panel empty-state' }, h('h2', {}, 'Batch not found'),
      h('p', { class: 'muted' }, message), h('a', { href: '#/' }, '← All batches')));
  }

  async function pollLoop() {
    setMode('polling');
    while (!stopped && !(batch && TERMINAL.has(batch.status))) {
      await sleep(1000);
      if (stopped || auth.needed) continue;
      try {
        update(await getJson(path, { signal: ac.signal }));
      } catch (e) {
        if (e.name === 'AbortError') return;
      }
    }
    setMode('ended');
  }

  async function follow() {
    try {
      update(await getJson(path, { signal: ac.signal }));
    } catch (e) {
      if (e.name === 'AbortError') return;
      if (e.status === 404) return showMissing(e.message);
      if (e.status === 401) return undefined; // the key form is shown; the view is mounted again with a key
      fill(el.head, h('p', { class: 'error-text' }, e.message));
    }
    let failures = 0;
    while (!stopped && !(batch && TERMINAL.has(batch.status))) {
      try {
        setMode('connecting');
        await streamEvents(`${path}/events`, {
          signal: ac.signal,
          onEvent: (name, data) => {
            if (name !== 'batch' || !data || typeof data !== 'object') return;
            failures = 0;
            setMode('live');
            update(data);
          },
        });
      } catch (e) {
        if (e.name === 'AbortError' || stopped) return undefined;
        if (e.status === 404 && e.code === 'unknown_url') return pollLoop(); // a server without the stream
        if (e.status === 404) return showMissing(e.message);
        if (e.status === 401) return undefined;
        failures++;
      }
      if (stopped || (batch && TERMINAL.has(batch.status))) break;
      // The stream ended early (a restart, a proxy): catch up, then reconnect.
      await sleep(Math.min(1000 * 2 ** failures, 10000));
      try {
        update(await getJson(path, { signal: ac.signal }));
      } catch (e) {
        if (e.name === 'AbortError') return undefined;
      }
    }
    setMode('ended');
    return undefined;
  }

  fill(el.progress, h('p', { class: 'muted' }, 'Loading…'));
  follow();
  const chartTimer = setInterval(renderCharts, 5000);
  return () => {
    stopped = true;
    ac.abort();
    clearInterval(chartTimer);
    unEngines();
    unmountEngine();
  };
}
