// The dashboard's entry point: header, API key form, hash routes
// (#/ the batches list, #/batch/ID one batch).
import { auth, authEvents, getKey, setKey, forgetKey, takeKeyFromHash } from './api.js';
import { h, fill, fmtPct, isNum } from './dom.js';
import { mountList } from './list.js';
import { mountBatch } from './batch.js';
import { onEngines, startEngines } from './engine.js';

const main = document.getElementById('main');
const authBox = document.getElementById('auth');
const keyStatus = document.getElementById('key-status');
const engineChip = document.getElementById('header-engine');

let unmount = null;

function route() {
  if (unmount) unmount();
  unmount = null;
  const m = /^#\/batch\/([^/?&#]+)/.exec(location.hash);
  if (m) {
    let id = m[1];
    try {
      id = decodeURIComponent(id);
    } catch {}
    document.title = `${id} · kvbatch`;
    unmount = mountBatch(main, id);
  } else {
    document.title = 'Batches · kvbatch';
    unmount = mountList(main);
  }
  for (const a of document.querySelectorAll('.nav a')) a.classList.toggle('active', !m && a.getAttribute('href') === '#/');
  window.scrollTo(0, 0);
}

function renderKeyStatus() {
  if (!getKey()) return fill(keyStatus);
  return fill(keyStatus,
    h('span', { class: 'key-saved', title: 'The API key is kept in this browser (localStorage)' }, 'API key saved'),
    h('button', {
      class: 'btn btn-small btn-ghost', id: 'forget-key', type: 'button',
      onclick: () => forgetKey(),
    }, 'Forget key'));
}

function renderAuth() {
  if (!auth.needed) {
    authBox.hidden = true;
    return fill(authBox);
  }
  const input = h('input', {
    type: 'password', id: 'key-input', name: 'key', autocomplete: 'current-password', required: true,
    placeholder: 'API key', 'aria-label': 'API key', spellcheck: 'false',
  });
  const had = Boolean(getKey());
  authBox.hidden = false;
  fill(authBox, h('form', {
    class: 'panel key-form', id: 'key-form',
    onsubmit: (ev) => {
      ev.preventDefault();
      const v = input.value.trim();
      if (v) setKey(v);
    },
  },
  h('h2', {}, 'API key required'),
  h('p', { class: 'muted' }, had
    ? 'The server refused the saved key. Enter the key this server was started with (kvbatch serve --api-key).'
    : 'This server requires an API key (kvbatch serve --api-key). It is kept in this browser\'s local storage and sent as a Bearer token with every API call.'),
  auth.message ? h('p', { class: 'error-text small', id: 'key-error' }, auth.message) : null,
  h('div', { class: 'inline' }, input, h('button', { class: 'btn btn-primary', type: 'submit', id: 'key-submit' }, 'Use key'))));
  queueMicrotask(() => input.focus());
  return authBox;
}

function renderEngineChip(st) {
  if (!st || !st.engines) return fill(engineChip);
  if (!st.supported) return fill(engineChip, st.models && st.models.length ? h('span', { class: 'chip' }, st.models.join(', ')) : null);
  if (!st.engines.length) return fill(engineChip, h('span', { class: 'chip' }, 'API-only node'));
  const e = st.engines[0];
  const kv = isNum(e.kv_cells) && e.kv_cells > 0 ? ` · KV ${fmtPct(e.kv_cells_used / e.kv_cells, 0)}` : '';
  const more = st.engines.length > 1 ? ` (+${st.engines.length - 1})` : '';
  return fill(engineChip, h('span', { class: 'chip chip-engine', title: 'model · device · KV cells in use' },
    h('span', { class: ['dot', (e.running || 0) > 0 ? 'dot-busy' : 'dot-idle'] }), `${e.model} · ${e.device}${more}${kv}`));
}

authEvents.addEventListener('required', () => {
  renderAuth();
  renderKeyStatus();
});
authEvents.addEventListener('changed', () => {
  renderAuth();
  renderKeyStatus();
  route();
  startEngines();
});
window.addEventListener('hashchange', () => {
  if (!takeKeyFromHash()) route();
});

takeKeyFromHash();
renderKeyStatus();
renderAuth();
onEngines(renderEngineChip);
route();
startEngines();
