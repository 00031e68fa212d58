// DOM building and formatting helpers. Text from the server (custom_ids,
// error messages, file names) only ever goes into text nodes or attributes,
// never through innerHTML.

const SVG_NS = 'http://www.w3.org/2000/svg';

function append(el, child) {
  if (child === null || child === undefined || child === false) return;
  if (Array.isArray(child)) {
    for (const c of child) append(el, c);
  } else if (child instanceof Node) {
    el.append(child);
  } else {
    el.append(document.createTextNode(String(child)));
  }
}

function applyAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.setAttribute('class', Array.isArray(v) ? v.filter(Boolean).join(' ') : v);
    else if (k === 'text') el.textContent = String(v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value' && 'value' in el) el.value = v;
    else if (k === 'checked' || k === 'disabled' || k === 'selected') el[k] = Boolean(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

// h('div', {class: 'x', onclick: f}, 'text', child, [more]) -> HTMLElement
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  applyAttrs(el, attrs);
  append(el, children);
  return el;
}

// The same for SVG elements.
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  applyAttrs(el, attrs);
  append(el, children);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// Replaces el's children with `children`.
export function fill(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

export const TERMINAL = new Set(['completed', 'failed', 'expired', 'cancelled']);

export const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

export function fmtInt(v) {
  return isNum(v) ? Math.round(v).toLocaleString('en-US') : '—';
}

// 0.1234 -> "12.3%"
export function fmtPct(v, digits = 1) {
  return isNum(v) ? `${(v * 100).toFixed(digits)}%` : '—';
}

export function fmtRate(v, unit = '/s') {
  if (!isNum(v)) return '—';
  const d = v >= 100 ? 0 : v >= 10 ? 1 : 2;
  return `${v.toFixed(d)}${unit}`;
}

// A number with k / M suffixes, for compact chart labels.
export function fmtCompact(v) {
  if (!isNum(v)) return '—';
  const a = Math.abs(v);
  if (a >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  if (a >= 10 || v === 0) return String(Math.round(v));
  return String(+v.toFixed(2));
}

export function fmtBytes(v) {
  if (!isNum(v)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let x = v;
  while (Math.abs(x) >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${i === 0 ? x : +x.toFixed(x >= 100 ? 0 : 1)} ${units[i]}`;
}

// Seconds -> "45 s", "3 min 20 s", "2 h 05 min", "3 d 4 h".
export function fmtDuration(sec) {
  if (!isNum(sec) || sec < 0) return '—';
  if (sec < 1) return '< 1 s';
  const s0 = Math.round(sec);
  if (s0 < 60) return `${s0} s`;
  const m = Math.floor(s0 / 60);
  if (m < 60) return `${m} min ${String(s0 % 60).padStart(2, '0')} s`;
  const hh = Math.floor(m / 60);
  if (hh < 48) return `${hh} h ${String(m % 60).padStart(2, '0')} min`;
  return `${Math.floor(hh / 24)} d ${hh % 24} h`;
}

// Unix seconds -> local date and time; today's dates show the time only.
export function fmtTime(t) {
  if (!isNum(t) || t <= 0) return '—';
  const d = new Date(t * 1000);
  const now = new Date();
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  if (d.toDateString() === now.toDateString()) return time;
  return `${d.toLocaleDateString([], { year: 'numeric', month: 'short', day: 'numeric' })} ${time}`;
}

export function fmtAgo(t) {
  if (!isNum(t) || t <= 0) return '';
  const sec = Date.now() / 1000 - t;
  if (sec < 5) return 'just now';
  return `${fmtDuration(sec).replace(/ \d+ s$/, '')} ago`;
}

// A status badge: <span class="badge badge-STATUS" data-status=...>
export function statusBadge(status, extra = {}) {
  const label = String(status || 'unknown').replace('_', ' ');
  return h('span', { class: `badge badge-${String(status || 'unknown').replace(/[^a-z_]/g, '')}`, 'data-status': status, ...extra }, label);
}

// A progress bar for a fraction 0..1 (null: indeterminate).
export function progressBar(fraction, { label, id, busy = false } = {}) {
  const pct = isNum(fraction) ? Math.max(0, Math.min(100, fraction * 100)) : null;
  const bar = h('div', {
    class: ['progress', pct === null && busy && 'progress-unknown'],
    role: 'progressbar',
    'aria-valuemin': '0',
    'aria-valuemax': '100',
    'aria-valuenow': pct === null ? null : pct.toFixed(1),
    id,
  }, h('div', { class: 'progress-fill', style: { width: `${pct === null ? 0 : pct}%` } }));
  return h('div', { class: 'progress-wrap' }, bar,
    h('span', { class: 'progress-label' }, label ?? (pct === null ? '—' : `${Math.floor(pct)}%`)));
}

// Average rates of a finished batch (the server reports live rates only):
// {rps, tps} over in_progress_at..end, or nulls when under a second.
export function averageRates(b) {
  const end = b.completed_at || b.cancelled_at || b.failed_at || b.expired_at || b.finalizing_at;
  const start = b.in_progress_at;
  if (!isNum(start) || !isNum(end) || end - start < 1) return { rps: null, tps: null };
  const c = b.request_counts || {};
  const u = b.usage || {};
  const d = end - start;
  return { rps: answeredCount(b, true) / d, tps: isNum(u.output_tokens) ? u.output_tokens / d : null };
}

// Requests answered: completed + failed; for a cancelled or expired batch
// (whose unanswered requests count as failed) only the completed ones when
// `run` is set.
export function answeredCount(b, run = false) {
  const c = b.request_counts || {};
  if (run && (b.status === 'cancelled' || b.status === 'expired')) return c.completed || 0;
  return (c.completed || 0) + (c.failed || 0);
}

// Errors by kind of a batch: counts of errors.data[] codes.
export function errorKinds(batch) {
  const counts = new Map();
  for (const e of (batch && batch.errors && batch.errors.data) || []) {
    const k = e.code || 'error';
    counts.set(k, (counts.get(k) || 0) + 1);
  }
  return counts;
}

// A short message at the bottom of the page; kind: 'ok' | 'error'.
export function toast(message, kind = 'ok') {
  let box = document.getElementById('toasts');
  if (!box) {
    box = h('div', { id: 'toasts', class: 'toasts', 'aria-live': 'polite' });
    document.body.append(box);
  }
  const t = h('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
  box.append(t);
  setTimeout(() => t.classList.add('toast-out'), kind === 'error' ? 6000 : 3000);
  setTimeout(() => t.remove(), kind === 'error' ? 6500 : 3500);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
