// The server's /v1 API: every call carries the stored API key, a 401 asks
// the page for one (authEvents 'required'), and the batch event stream is
// read with fetch() so that it can carry the Authorization header too
// (EventSource cannot send headers).

const KEY_STORE = 'kvbatch.apiKey';

export const authEvents = new EventTarget();
export const auth = { needed: false, message: '' };

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORE) || '';
  } catch {
    return '';
  }
}

export function setKey(key) {
  try {
    localStorage.setItem(KEY_STORE, key);
  } catch {}
  auth.needed = false;
  auth.message = '';
  authEvents.dispatchEvent(new Event('changed'));
}

export function forgetKey() {
  try {
    localStorage.removeItem(KEY_STORE);
  } catch {}
  authEvents.dispatchEvent(new Event('changed'));
}

// A key in the URL fragment (`#key=KEY`, or `#/batch/ID&key=KEY`) is stored
// and removed from the address bar. Returns true when there was one.
export function takeKeyFromHash() {
  const hash = location.hash.replace(/^#/, '');
  const m = /(^|[?&])key=([^&]*)/.exec(hash);
  if (!m) return false;
  let key = m[2];
  try {
    key = decodeURIComponent(key);
  } catch {}
  const rest = (hash.slice(0, m.index) + hash.slice(m.index + m[0].length))
    .replace(/[?&]$/, '').replace(/^[?&]/, '');
  history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
  if (key) setKey(key);
  return Boolean(key);
}

export class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (error && error.code) || '';
    this.type = (error && error.type) || '';
    this.param = (error && error.param) || null;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function authRequired(message) {
  auth.needed = true;
  auth.message = message || '';
  authEvents.dispatchEvent(new Event('required'));
}

// An ApiError for a non-2xx answer. A 401 asks for a key, unless the key
// changed while the request was on its way (its answer is stale).
async function failure(res, keyUsed) {
  let error = null;
  try {
    const body = await res.json();
    error = body && body.error;
  } catch {}
  if (res.status === 401 && keyUsed === getKey()) authRequired(error && error.message);
  return new ApiError(res.status, error);
}

// fetch() of a /v1 path with the key; throws ApiError for non-2xx answers.
export async function request(path, { method = 'GET', json, body, signal } = {}) {
  const keyUsed = getKey();
  const init = { method, signal, headers: headers() };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers['Content-Type'] = 'application/json';
  } else if (body !== undefined) {
    init.body = body;
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, { message: `The server cannot be reached (${e.message}).`, code: 'network_error' });
  }
  if (!res.ok) throw await failure(res, keyUsed);
  return res;
}

export async function getJson(path, opts) {
  return (await request(path, opts)).json();
}

export async function postJson(path, json, opts = {}) {
  return (await request(path, { ...opts, method: 'POST', json })).json();
}

// POST without a body (cancel, pause, resume).
export async function post(path, opts = {}) {
  return (await request(path, { ...opts, method: 'POST' })).json();
}

export async function uploadFile(file, purpose = 'batch') {
  const form = new FormData();
  form.append('purpose', purpose);
  form.append('file', file, file.name);
  return (await request('/v1/files', { method: 'POST', body: form })).json();
}

export async function fileText(id, opts) {
  return (await request(`/v1/files/${encodeURIComponent(id)}/content`, opts)).text();
}

// The first maxLines non-blank lines of a file, read as a stream (an error
// file can be large): {lines, truncated}.
export async function fileHead(id, maxLines, { signal } = {}) {
  const res = await request(`/v1/files/${encodeURIComponent(id)}/content`, { signal });
  const lines = [];
  let truncated = false;
  const take = (l) => {
    if (!l.trim()) return;
    if (lines.length < maxLines) lines.push(l);
    else truncated = true;
  };
  if (!res.body) {
    for (const l of (await res.text()).split('\n')) take(l);
    return { lines, truncated };
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  try {
    while (!truncated) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while (!truncated && (nl = buf.indexOf('\n')) >= 0) {
        take(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
      }
    }
    if (!truncated) take(buf + decoder.decode());
  } finally {
    if (truncated) reader.cancel().catch(() => {});
    else reader.releaseLock();
  }
  return { lines, truncated };
}

function clickDownload(href, filename) {
  const a = document.createElement('a');
  a.href = href;
  a.download = filename;
  a.style.display = 'none';
  document.body.append(a);
  a.click();
  a.remove();
}

// Saves a file's content. With a key, through a blob: URL (a plain link
// cannot send the Authorization header; the file is held in memory once);
// without one, a plain link, which the browser streams to disk.
export async function downloadFile(id, filename) {
  const path = `/v1/files/${encodeURIComponent(id)}/content`;
  if (!getKey()) {
    clickDownload(path, filename);
    return;
  }
  const blob = await (await request(path)).blob();
  const url = URL.createObjectURL(blob);
  clickDownload(url, filename);
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// Reads a text/event-stream with fetch(): calls onEvent(name, data) for
// each event (data parsed as JSON when it is JSON). Resolves when the server
// closes the stream; rejects with ApiError for an error answer, or with the
// network error. `signal` aborts it.
export async function streamEvents(path, { onEvent, signal }) {
  const res = await request(path, { signal });
  if (!res.body) throw new ApiError(0, { message: 'This browser cannot read streams.', code: 'no_stream' });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let name = '';
  let data = [];
  const dispatch = () => {
    if (data.length) {
      const text = data.join('\n');
      let parsed = text;
      try {
        parsed = JSON.parse(text);
      } catch {}
      onEvent(name || 'message', parsed);
    }
    name = '';
    data = [];
  };
  const line = (l) => {
    if (l === '') return dispatch();
    if (l.startsWith(':')) return undefined;
    const i = l.indexOf(':');
    const field = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? '' : l.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
    return undefined;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        // A lone \r at the end may be the first half of \r\n: wait for more.
        if (buf[nl] === '\r' && nl === buf.length - 1) break;
        const len = buf.startsWith('\r\n', nl) ? 2 : 1;
        line(buf.slice(0, nl));
        buf = buf.slice(nl + len);
      }
    }
    buf += decoder.decode();
    if (buf) line(buf);
    dispatch();
  } finally {
    reader.releaseLock();
  }
}
