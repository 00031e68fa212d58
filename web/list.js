// The batches list (polled every 2 s) and the new-batch form.
import { auth, getJson, postJson, uploadFile, fileText, ApiError } from './api.js';
import {
  h, fill, fmtInt, fmtPct, fmtRate, fmtDuration, fmtAgo, fmtBytes, statusBadge, progressBar, errorKinds, averageRates,
  answeredCount, isNum, TERMINAL, toast,
} from './dom.js';
import { mountEnginePanel } from './engine.js';
import { recordBatch } from './batch.js';

const POLL_MS = 2000;
const MAX_ERROR_FILE_BYTES = 4 << 20;

// Error kinds of finished batches, read from their error files once:
// file id -> Map(code -> count), or null while loading / when too large.
const errorFileKinds = new Map();

function lineErrorCode(line) {
  const r = line && line.response;
  const e = (r && r.body && r.body.error) || line.error || null;
  return (e && (e.code || e.type)) || (r && r.status_code ? `http_${r.status_code}` : 'error');
}

let errorFilesLoading = 0;

async function loadErrorKinds(fileId, onDone) {
  if (errorFilesLoading >= 3) return; // the next poll tries again
  errorFilesLoading++;
  errorFileKinds.set(fileId, null);
  try {
    const f = await getJson(`/v1/files/${encodeURIComponent(fileId)}`);
    if (!(f.bytes <= MAX_ERROR_FILE_BYTES)) return;
    const counts = new Map();
    for (const l of (await fileText(fileId)).split('\n')) {
      if (!l.trim()) continue;
      let code = 'unparsable_line';
      try {
        code = lineErrorCode(JSON.parse(l));
      } catch {}
      counts.set(code, (counts.get(code) || 0) + 1);
    }
    errorFileKinds.set(fileId, counts);
    onDone();
  } catch (e) {
    // Tried again on a later poll after a 401 only (a key was given meanwhile).
    if (e instanceof ApiError && e.status === 401) errorFileKinds.delete(fileId);
  } finally {
    errorFilesLoading--;
  }
}

function errorsCell(b, rerender) {
  const chips = [];
  for (const [code, n] of errorKinds(b)) chips.push(h('span', { class: 'chip chip-error', title: 'input file errors' }, `${code} ×${n}`));
  const failed = b.request_counts ? b.request_counts.failed : 0;
  if (failed > 0) {
    const kinds = b.error_file_id ? errorFileKinds.get(b.error_file_id) : undefined;
    if (kinds === undefined && b.error_file_id && TERMINAL.has(b.status)) loadErrorKinds(b.error_file_id, rerender);
    if (kinds) {
      for (const [code, n] of kinds) chips.push(h('span', { class: 'chip chip-error', title: 'failed requests' }, `${code} ×${n}`));
    } else {
      chips.push(h('span', { class: 'chip chip-error' }, `${fmtInt(failed)} failed`));
    }
  }
  return chips.length ? h('div', { class: 'chips' }, chips) : h('span', { class: 'muted' }, '—');
}

// The row of a batch. Its <tr> and link are kept from one poll to the next
// (a link replaced between mousedown and mouseup would lose the click); the
// other cells are refilled.
function batchRow(b, rerender, cache) {
  const x = b.kvbatch || {};
  const c = b.request_counts || {};
  const done = (c.completed || 0) + (c.failed || 0);
  // A cancelled or expired batch counts its unanswered requests as failed: its bar shows what ran.
  const stopped = (b.status === 'cancelled' || b.status === 'expired') && c.total > 0;
  const ran = answeredCount(b, true);
  const running = b.status === 'in_progress' && !x.paused;
  const avg = TERMINAL.has(b.status) ? averageRates(b) : null;
  const rate = (live, avgValue) => {
    if (running) return fmtRate(live);
    if (avg && isNum(avgValue)) return h('span', { class: 'muted', title: 'average over the run' }, fmtRate(avgValue));
    return '—';
  };
  const contents = [
    ['col-status', h('div', { class: 'badges' }, statusBadge(b.status), x.paused && !TERMINAL.has(b.status)
      ? h('span', { class: 'badge badge-paused' }, 'paused') : null)],
    ['col-progress', progressBar(stopped ? ran / c.total : isNum(x.progress) ? x.progress : (c.total ? done / c.total : null), {
      label: c.total ? `${fmtInt(stopped ? ran : done)} / ${fmtInt(c.total)}` : '—',
      busy: !TERMINAL.has(b.status),
    })],
    ['col-num col-opt', running ? fmtDuration(x.eta_seconds) : '—'],
    ['col-num', rate(x.requests_per_second, avg && avg.rps)],
    ['col-num col-opt', rate(x.tokens_per_second, avg && avg.tps)],
    ['col-num col-opt', fmtPct(x.prefix_cache_hit_rate)],
    ['col-errors', errorsCell(b, rerender)],
    ['col-num col-priority', isNum(x.priority) ? String(x.priority) : '—'],
  ];
  let row = cache.get(b.id);
  if (!row) {
    const href = `#/batch/${encodeURIComponent(b.id)}`;
    const sub = h('div', { class: 'muted small' });
    const cells = contents.map(([cls]) => h('td', { class: cls }));
    row = {
      sub, cells,
      tr: h('tr', { 'data-batch-id': b.id, class: 'batch-row' },
        h('td', { class: 'col-id' }, h('a', { href, class: 'batch-link mono' }, b.id), sub), cells),
    };
    cache.set(b.id, row);
  }
  fill(row.sub, `${(b.endpoint || '').replace('/v1/', '')} · ${fmtAgo(b.created_at)}`);
  contents.forEach(([, content], i) => fill(row.cells[i], content));
  return row.tr;
}

function uploadForm(onCreated) {
  const fileInput = h('input', { type: 'file', id: 'upload-file', name: 'file', accept: '.jsonl,.json,.txt,application/jsonl', required: true });
  const fileInfo = h('span', { class: 'muted small', id: 'upload-file-info' }, 'One request per line (OpenAI Batch API format).');
  fileInput.addEventListener('change', () => {
    const f = fileInput.files[0];
    fill(fileInfo, f ? `${f.name} · ${fmtBytes(f.size)}` : 'One request per line (OpenAI Batch API format).');
  });
  const endpoint = h('select', { id: 'upload-endpoint', name: 'endpoint' },
    h('option', { value: '/v1/chat/completions' }, '/v1/chat/completions'),
    h('option', { value: '/v1/completions' }, '/v1/completions'));
  const windowSel = h('select', { id: 'upload-window', name: 'completion_window' }, h('option', { value: '24h' }, '24h'));
  const priority = h('input', {
    type: 'number', id: 'upload-priority', name: 'priority', min: '-1000', max: '1000', step: '1', placeholder: '0',
  });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', id: 'upload-submit' }, 'Upload and create batch');
  const status = h('div', { class: 'form-status', id: 'upload-status', 'aria-live': 'polite' });

  const form = h('form', { class: 'panel upload-form', id: 'upload-form', novalidate: true },
    h('h2', {}, 'New batch'),
    h('label', { class: 'field field-file' }, h('span', { class: 'field-label' }, 'Input file (JSONL)'), fileInput, fileInfo),
    h('div', { class: 'field-row' },
      h('label', { class: 'field' }, h('span', { class: 'field-label' }, 'Endpoint'), endpoint),
      h('label', { class: 'field' }, h('span', { class: 'field-label', title: 'completion_window' }, 'Window'), windowSel),
      h('label', { class: 'field' }, h('span', { class: 'field-label' }, 'Priority (optional)'), priority)),
    h('div', { class: 'form-actions' }, submit),
    status);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const file = fileInput.files[0];
    if (!file) return fill(status, h('span', { class: 'error-text' }, 'Choose a JSONL file first.'));
    const p = priority.value.trim();
    if (p !== '' && !(/^-?\d+$/.test(p) && Math.abs(Number(p)) <= 1000)) {
      return fill(status, h('span', { class: 'error-text' }, 'Priority must be an integer from -1000 to 1000.'));
    }
    submit.disabled = true;
    try {
      fill(status, h('span', { class: 'muted' }, `Uploading ${file.name}…`));
      const f = await uploadFile(file);
      fill(status, h('span', { class: 'muted' }, 'Creating the batch…'));
      const body = { input_file_id: f.id, endpoint: endpoint.value, completion_window: windowSel.value };
      if (p !== '') body.metadata = { priority: String(Number(p)) };
      const b = await postJson('/v1/batches', body);
      recordBatch(b);
      form.reset();
      fill(fileInfo, 'One request per line (OpenAI Batch API format).');
      fill(status, h('span', { class: 'ok-text' }, 'Created ',
        h('a', { href: `#/batch/${encodeURIComponent(b.id)}`, class: 'mono', id: 'upload-created' }, b.id),
        ` from ${file.name} (${fmtBytes(f.bytes)}).`));
      onCreated(b);
    } catch (e) {
      fill(status, h('span', { class: 'error-text' }, e.message));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

export function mountList(root) {
  let timer = null;
  let stopped = false;
  let batches = null;
  let loadError = '';

  const tbody = h('tbody', { id: 'batch-rows' });
  const rows = new Map(); // batch id -> its row (batchRow)
  const errorLine = h('div', { class: 'error-text small', id: 'list-error' });
  const countEl = h('span', { class: 'muted small', id: 'batch-count' });
  const table = h('div', { class: 'panel batches-panel' },
    h('div', { class: 'panel-head' }, h('h2', {}, 'Batches'), countEl),
    h('div', { class: 'table-wrap' },
      h('table', { class: 'batches', id: 'batches-table' },
        h('thead', {}, h('tr', {},
          h('th', {}, 'Batch'), h('th', {}, 'Status'), h('th', { class: 'col-progress' }, 'Progress'),
          h('th', { class: 'col-num col-opt' }, 'ETA'), h('th', { class: 'col-num' }, 'Req/s'),
          h('th', { class: 'col-num col-opt' }, 'Tokens/s'), h('th', { class: 'col-num col-opt' }, 'Cache hit'),
          h('th', {}, 'Errors'), h('th', { class: 'col-num' }, 'Priority'))),
        tbody)),
    errorLine);
  const enginePanel = h('section', { id: 'engine-panel' });
  const unmountEngine = mountEnginePanel(enginePanel);

  const render = () => {
    if (stopped) return;
    fill(errorLine, batches ? loadError : '');
    if (!batches) {
      fill(tbody, h('tr', {}, h('td', { colspan: '9', class: 'muted empty' }, loadError || 'Loading…')));
      return;
    }
    fill(countEl, `${batches.length} batch${batches.length === 1 ? '' : 'es'}`);
    if (!batches.length) {
      fill(tbody, h('tr', {}, h('td', { colspan: '9', class: 'muted empty' }, 'No batches yet: upload a JSONL file to create one.')));
      return;
    }
    const trs = batches.map((b) => batchRow(b, render, rows));
    const ids = new Set(batches.map((b) => b.id));
    for (const id of rows.keys()) if (!ids.has(id)) rows.delete(id);
    if (trs.length !== tbody.children.length || trs.some((tr, i) => tbody.children[i] !== tr)) tbody.replaceChildren(...trs);
  };

  let inflight = false;
  let again = false;
  const poll = async () => {
    if (timer) clearTimeout(timer);
    timer = null;
    if (inflight) {
      again = true;
      return;
    }
    inflight = true;
    if (!auth.needed && !document.hidden) {
      try {
        const r = await getJson('/v1/batches?limit=100');
        batches = r.data || [];
        loadError = '';
        for (const b of batches) recordBatch(b);
      } catch (e) {
        if (e.status !== 401) loadError = `Cannot list batches: ${e.message}`;
      }
      render();
    }
    inflight = false;
    if (stopped) return;
    if (again) {
      again = false;
      poll();
    } else {
      timer = setTimeout(poll, POLL_MS);
    }
  };

  const form = uploadForm(() => {
    toast('Batch created');
    poll();
  });
  fill(root, h('div', { class: 'list-view', id: 'list-view' },
    h('div', { class: 'top-grid' }, form, enginePanel), table));
  render();
  poll();
  return () => {
    stopped = true;
    if (timer) clearTimeout(timer);
    unmountEngine();
  };
}
