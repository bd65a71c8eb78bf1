// The page's only way to the gateway: JSON calls that carry the bearer token, and the live
// incident stream read with fetch() and a ReadableStream parser (EventSource cannot send an
// Authorization header), resuming with Last-Event-ID after a drop.

const TOKEN_KEY = 'citywatch.token';

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let unauthorizedHandler = () => {};
/// Called with no argument whenever the API answers 401 (no token, or a wrong one).
export function onUnauthorized(handler) { unauthorizedHandler = handler; }

export const token = () => localStorage.getItem(TOKEN_KEY) || '';
export function setToken(value) {
  if (value) localStorage.setItem(TOKEN_KEY, value); else localStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const h = { Accept: 'application/json', ...extra };
  const tok = token();
  if (tok) h.Authorization = `Bearer ${tok}`;
  return h;
}

/// GET (or POST with `body`) a JSON document; throws ApiError with the API's own message.
export async function api(path, { method = 'GET', body } = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (res.status === 401) unauthorizedHandler();
  if (!res.ok) throw new ApiError(res.status, (data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

/// Every item of a paginated list (`GET devices`, `inspections`, …): follows `next_cursor`
/// page by page (1000 a page). Returns the first page's document with `key` holding all items.
export async function apiAll(path, key) {
  const sep = path.includes('?') ? '&' : '?';
  const first = await api(`${path}${sep}limit=1000`);
  const items = [...(first[key] ?? [])];
  for (let page = first; page.next_cursor; ) {
    page = await api(`${path}${sep}limit=1000&cursor=${encodeURIComponent(page.next_cursor)}`);
    items.push(...(page[key] ?? []));
  }
  return { ...first, [key]: items, count: items.length, next_cursor: null };
}

/// A Server-Sent Events reader over fetch(). `onEvent(type, data, id)` for each event;
/// `onState('connecting' | 'live' | 'reconnecting' | 'offline')`; `onOpen(resumed)` once the
/// stream answers (resumed = it was asked to catch up from Last-Event-ID).
export class LiveStream {
  constructor(path, { onEvent, onState, onOpen }) {
    Object.assign(this, { path, onEvent, onState, onOpen });
    this.lastEventId = null;
    this.controller = null;
    this.stopped = true;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.loop();
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
    this.onState('offline');
  }

  async loop() {
    let backoff = 500;
    while (!this.stopped) {
      this.onState(this.lastEventId === null ? 'connecting' : 'reconnecting');
      this.controller = new AbortController();
      try {
        const extra = { Accept: 'text/event-stream' };
        if (this.lastEventId !== null) extra['Last-Event-ID'] = this.lastEventId;
        const res = await fetch(this.path, { headers: headers(extra), signal: this.controller.signal, cache: 'no-store' });
        if (res.status === 401) {
          this.stopped = true;
          this.onState('offline');
          unauthorizedHandler();
          return;
        }
        if (!res.ok || !res.body) throw new Error(`events: ${res.status}`);
        backoff = 500;
        this.onState('live');
        this.onOpen?.(this.lastEventId !== null);
        await this.read(res.body);
      } catch (e) {
        if (this.stopped) return;
        console.warn('live stream interrupted', e);
      }
      if (this.stopped) return;
      this.onState('reconnecting');
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 10000);
    }
  }

  /// The event-stream format: lines of `field: value`, an empty line ends an event.
  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let type = '', data = [], id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        // A lone \r at the end may be the first half of \r\n: wait for more.
        if (buffer[nl] === '\r' && nl === buffer.length - 1) break;
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (id !== null) this.lastEventId = id;
          if (data.length) this.onEvent(type || 'message', data.join('\n'), id);
          type = ''; data = []; id = null;
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') type = val;
        else if (field === 'data') data.push(val);
        else if (field === 'id' && !val.includes('\0')) id = val;
      }
    }
  }
}
