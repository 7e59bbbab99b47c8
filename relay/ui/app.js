// The agentrun web UI: a run list at "/" and a run page at "/runs/{run}".
//
// Agent output, logs, status messages and metrics are untrusted: they only ever reach the page
// through textContent / createTextNode (see el() below) or the Markdown renderer, which builds
// DOM nodes the same way. Nothing here uses innerHTML, and the relay's Content-Security-Policy
// forbids inline scripts on top of that.

import { AnsiParser, plainText } from './ansi.js';
import { Screen, runsOf } from './terminal.js';
import { parse as parseMarkdown, render as renderMarkdown } from './markdown.js';

const OUTPUT_CAP = 256 * 1024; // characters of output kept on the page per variation
const MARKDOWN_CAP = 128 * 1024; // characters of output rendered as Markdown
const LOG_LINES_CAP = 2000; // log lines kept per variation
const LOG_LINE_CAP = 8 * 1024; // characters shown of one log line
const TIMELINE_CAP = 500; // status entries kept
const CHANNELS = 'output,logs,status,metrics';
// Event names the relay may send. "gap" is an entry of a stream; the others are notices about
// the stream itself (history trimmed past the cursor, history reset, the relay going away...).
const EVENT_NAMES = ['open', 'output', 'logs', 'status', 'metrics', 'gap', 'end', 'trimmed', 'reset', 'shutdown', 'notice'];
const CONTROL_RETRY_MS = 15000; // how long a control action is sent again while unconfirmed
const FINAL = new Set(['succeeded', 'failed', 'stopped']);
const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];

// ---------------------------------------------------------------------------------------------
// Small DOM helpers: text is always set with textContent.

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'title') e.title = v;
    else if (k === 'href') e.href = v; // only ever set to URLs this file builds
    else if (k === 'download') e.download = v;
    else if (k === 'hidden') e.hidden = true;
    else if (k === 'disabled') e.disabled = true;
    else if (k === 'open') e.open = true;
    else if (k === 'tabindex') e.tabIndex = Number(v);
    else if (k === 'placeholder') e.placeholder = v;
    else if (k === 'autocomplete') e.autocomplete = v;
    else if (k === 'type') e.type = v;
    else if (k === 'value') e.value = v;
    else if (k === 'onclick') e.addEventListener('click', v);
    else if (k === 'onchange') e.addEventListener('change', v);
    else if (k.startsWith('data-')) e.setAttribute(k, String(v));
    else if (k.startsWith('aria-')) e.setAttribute(k, String(v));
    else throw new Error(`el(): unsupported property ${k}`);
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    e.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return e;
}

function badge(state) {
  const s = typeof state === 'string' && state ? state.toLowerCase() : 'unknown';
  return el('span', { class: `badge st-${/^[a-z]+$/.test(s) ? s : 'unknown'}`, text: s });
}

function fmtTime(ms) {
  const n = Number(ms);
  if (!Number.isFinite(n) || n <= 0) return '';
  const d = new Date(n);
  return d.toLocaleTimeString([], { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');
}

function fmtDate(ms) {
  const n = Number(ms);
  if (!Number.isFinite(n) || n <= 0) return '';
  return new Date(n).toLocaleString([], { hour12: false });
}

function fmtBytes(n) {
  const v = Number(n);
  if (!Number.isFinite(v)) return String(n);
  if (v < 1024) return `${v} B`;
  if (v < 1024 * 1024) return `${(v / 1024).toFixed(1)} KiB`;
  return `${(v / 1024 / 1024).toFixed(1)} MiB`;
}

function clip(s, n) {
  s = String(s);
  return s.length > n ? `${s.slice(0, n)}… (${s.length - n} more characters)` : s;
}

function setConn(state, text) {
  const c = document.getElementById('conn');
  c.dataset.state = state;
  c.textContent = text;
}

function api(path) {
  return `/api${path}`;
}

// ---------------------------------------------------------------------------------------------
// Run state as the relay returns it (`run:{RUN}:state` hash; values may be JSON text)

function parseMaybeJson(v) {
  if (typeof v !== 'string') return v;
  const t = v.trim();
  if (t.startsWith('{') || t.startsWith('[')) {
    try {
      return JSON.parse(t);
    } catch {
      return v;
    }
  }
  return v;
}

/** Normalises a run object or state hash into {id, created, variations, vars, phase, ended}. */
function normalizeRun(raw, id) {
  const r = raw && typeof raw === 'object' ? raw : {};
  let fields = r;
  for (const k of ['state', 'fields', 'hash']) {
    if (r[k] && typeof r[k] === 'object' && !Array.isArray(r[k])) {
      fields = { ...r[k], ...Object.fromEntries(Object.entries(r).filter(([key]) => key !== k)) };
      break;
    }
  }
  const vars = {};
  const varsObj = fields.variationStates || fields.vars || (typeof fields.variations === 'object' && !Array.isArray(fields.variations) ? fields.variations : null);
  if (varsObj) for (const [k, v] of Object.entries(varsObj)) vars[k] = parseMaybeJson(v);
  for (const [k, v] of Object.entries(fields)) if (k.startsWith('var:')) vars[k.slice(4)] = parseMaybeJson(v);
  let variations = fields.variations;
  if (typeof variations === 'string') variations = variations.split(',').map((s) => s.trim()).filter(Boolean);
  else if (Array.isArray(variations)) variations = variations.map((v) => (typeof v === 'string' ? v : v && v.name)).filter(Boolean);
  else variations = [];
  for (const k of Object.keys(vars)) if (!variations.includes(k)) variations.push(k);
  const phaseRaw = parseMaybeJson(fields.phase);
  const phase = typeof phaseRaw === 'string' ? phaseRaw : phaseRaw && phaseRaw.state;
  return {
    id: String(r.run || r.id || r.name || id || ''),
    created: Number(fields.created || r.created) || 0,
    variations,
    vars,
    phase: phase ? String(phase).toLowerCase() : '',
    ended: fields.ended || r.ended || '',
    name: typeof fields.name === 'string' ? fields.name : '',
    namespace: typeof fields.namespace === 'string' ? fields.namespace : '',
  };
}

function overallState(run) {
  if (run.phase) return run.phase;
  const states = Object.values(run.vars).map((v) => (v && v.state) || 'pending');
  if (!states.length) return run.ended ? 'succeeded' : 'pending';
  for (const s of ['failed', 'running', 'paused', 'starting', 'pending', 'stopped']) if (states.includes(s)) return s;
  return states[0];
}

// ---------------------------------------------------------------------------------------------
// Run list

async function listPage(app) {
  document.title = 'Runs · agentrun';
  const tbody = el('tbody');
  const info = el('p', { class: 'empty', text: 'Loading runs…' });
  const table = el('table', { class: 'runs', hidden: true },
    el('thead', {}, el('tr', {}, el('th', { text: 'Run' }), el('th', { text: 'State' }), el('th', { text: 'Variations' }), el('th', { text: 'Created' }))),
    tbody);
  app.replaceChildren(el('section', { class: 'page' }, el('h1', { text: 'Runs' }), info, table));

  const refresh = async () => {
    try {
      const res = await apiFetch(api('/runs'), { headers: { accept: 'application/json' } });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const body = await res.json();
      const list = Array.isArray(body) ? body : body.runs || body.items || [];
      const runs = list.map((r) => normalizeRun(typeof r === 'string' ? { run: r } : r));
      tbody.replaceChildren(...runs.map((run) => {
        const link = el('a', { href: `/runs/${encodeURIComponent(run.id)}`, text: run.id });
        const vars = el('span', { class: 'vars' }, ...run.variations.map((v) => el('span', { class: 'var-chip' }, v, ' ', badge(run.vars[v] && run.vars[v].state))));
        const owner = run.name ? el('div', { class: 'muted small', text: run.namespace ? `${run.namespace}/${run.name}` : run.name }) : null;
        return el('tr', { 'data-run': run.id }, el('td', {}, link, owner), el('td', {}, badge(overallState(run))), el('td', {}, vars), el('td', { class: 'muted', text: fmtDate(run.created) }));
      }));
      table.hidden = runs.length === 0;
      info.hidden = runs.length > 0;
      info.textContent = 'No runs yet. Start one with `agentrun-sidecar run -- COMMAND` or by creating an AgentRun.';
      setConn('live', 'connected');
    } catch (e) {
      info.hidden = false;
      info.textContent = `Cannot list runs: ${e.message}`;
      setConn('down', 'relay unreachable');
    }
  };
  await refresh();
  setInterval(() => {
    if (!document.hidden) refresh();
  }, 5000);
}

// ---------------------------------------------------------------------------------------------
// Auto-scroll: follows the bottom until the user scrolls up; scrolling back down resumes.

class Follower {
  constructor(scroller, button) {
    this.scroller = scroller;
    this.button = button;
    this.stuck = true;
    this.lastTop = 0;
    this.pending = false;
    scroller.addEventListener('scroll', () => {
      const top = scroller.scrollTop;
      if (this.atBottom()) this.stuck = true;
      else if (top < this.lastTop - 1) this.stuck = false;
      this.lastTop = top;
      this.button.hidden = this.stuck;
    });
    scroller.addEventListener('wheel', (e) => {
      if (e.deltaY < 0 && scroller.scrollTop > 0) {
        this.stuck = false;
        this.button.hidden = false;
      }
    }, { passive: true });
    button.addEventListener('click', () => {
      this.stuck = true;
      this.button.hidden = true;
      this.now();
    });
  }

  atBottom() {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight <= 4;
  }

  /** Call after adding content. */
  changed() {
    if (this.pending) return;
    this.pending = true;
    setTimeout(() => {
      this.pending = false;
      this.now();
    }, 30);
  }

  now() {
    if (this.stuck) {
      this.scroller.scrollTop = this.scroller.scrollHeight;
      this.lastTop = this.scroller.scrollTop;
    } else if (!this.atBottom()) this.button.hidden = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Output pane: lines as a terminal shows them (terminal.js), or every byte made visible (raw),
// capped; Markdown view of the same text.

class OutputPane {
  constructor() {
    this.raw = false;
    this.source = []; // what was written, to render again in the other mode: {text} or {marker, kind}
    this.sourceSize = 0;
    this.sourceDropped = 0;
    this.markdownText = '';
    this.markdownMode = false;
    this.markdownTimer = null;
    this.trimNotice = el('div', { class: 'trim-notice', hidden: true });
    this.term = el('pre', { class: 'term' });
    this.md = el('div', { class: 'markdown', hidden: true });
    this.scroller = el('div', { class: 'scroll output-scroll', tabindex: 0, 'aria-label': 'Output' }, this.trimNotice, this.term, this.md);
    this.followButton = el('button', { class: 'follow', type: 'button', hidden: true, text: '↓ Follow output' });
    this.follower = new Follower(this.scroller, this.followButton);
    this.root = el('div', { class: 'pane output-pane' }, this.scroller, this.followButton);
    this.clear();
  }

  /** Empties the view (not the source). */
  clear() {
    this.parser = new AnsiParser({ mode: this.raw ? 'raw' : 'terminal' });
    // Half the cap: trimming whole older lines always leaves the current one on the page.
    this.screen = new Screen({ maxLine: OUTPUT_CAP / 2 });
    this.items = []; // lines that no longer change, and markers: {node, len}
    this.size = 0; // characters on the page
    this.trimmed = this.sourceDropped;
    this.term.replaceChildren();
  }

  write(text) {
    if (!text) return;
    this.remember({ text });
    const segs = this.parser.push(text);
    this.paint(this.screen.apply(segs));
    this.markdownText += plainText(segs);
    if (this.markdownText.length > MARKDOWN_CAP * 1.25) this.markdownText = this.markdownText.slice(-MARKDOWN_CAP);
    this.trim();
    this.changed();
  }

  /** Keeps what was written (bounded) so that the other mode can show it. */
  remember(chunk) {
    this.source.push(chunk);
    this.sourceSize += (chunk.text || chunk.marker).length;
    while (this.sourceSize > OUTPUT_CAP * 2 && this.source.length > 1) {
      const first = this.source.shift();
      const n = (first.text || first.marker).length;
      this.sourceSize -= n;
      this.sourceDropped += n;
    }
  }

  paint({ changed, frozen }) {
    this.trimmed += this.screen.dropped;
    this.screen.dropped = 0;
    for (const line of changed) {
      if (!line.node) {
        line.node = el('span', { class: 'ln' });
        line.size = 0;
        this.term.appendChild(line.node);
      }
      const parts = runsOf(line).map((r) => (r.cls ? el('span', { class: r.cls }, r.text) : document.createTextNode(r.text)));
      if (line.nl) parts.push('\n');
      line.node.replaceChildren(...parts);
      const size = line.text.length + (line.nl ? 1 : 0);
      this.size += size - line.size;
      line.size = size;
    }
    for (const line of frozen) this.freeze(line);
  }

  freeze(line) {
    if (line.node) this.items.push({ node: line.node, len: line.size });
  }

  /** A visible notice inside the output (gap, missing entries, trimmed history...). */
  marker(message, kind = 'warn') {
    this.remember({ marker: message, kind });
    this.showMarker(message, kind);
    this.markdownText += `\n\n> ${message}\n\n`;
    this.trim();
    this.changed();
  }

  showMarker(message, kind) {
    for (const line of this.screen.freezeAll()) this.freeze(line);
    const node = el('span', { class: `marker marker-${kind}` }, message);
    this.term.appendChild(node);
    this.items.push({ node, len: message.length });
    this.size += message.length;
  }

  trim() {
    while (this.size > OUTPUT_CAP) {
      if (this.items.length === 0) {
        const line = this.screen.freezeOldest();
        if (!line) break;
        this.freeze(line);
        continue;
      }
      const first = this.items.shift();
      first.node.remove();
      this.size -= first.len;
      this.trimmed += first.len;
    }
    if (this.trimmed > 0) {
      this.trimNotice.hidden = false;
      this.trimNotice.textContent = `${fmtBytes(this.trimmed)} of earlier output is not shown here (the page keeps the latest ${fmtBytes(OUTPUT_CAP)}). The full output stays in the run's stream: kubectl agentrun logs RUN.`;
    }
  }

  /** Raw: every byte visible, nothing interpreted; otherwise as a terminal shows it. */
  setRaw(on) {
    if (on === this.raw) return;
    this.raw = on;
    this.clear();
    for (const chunk of this.source) {
      if (chunk.text) this.paint(this.screen.apply(this.parser.push(chunk.text)));
      else this.showMarker(chunk.marker, chunk.kind);
      this.trim();
    }
    this.follower.changed();
  }

  setMarkdown(on) {
    this.markdownMode = on;
    this.term.hidden = on;
    this.md.hidden = !on;
    if (on) this.renderMarkdown();
    else this.md.replaceChildren();
    this.follower.changed();
  }

  changed() {
    if (this.markdownMode && !this.markdownTimer) {
      this.markdownTimer = setTimeout(() => {
        this.markdownTimer = null;
        this.renderMarkdown();
      }, 250);
    }
    this.follower.changed();
  }

  renderMarkdown() {
    if (!this.markdownMode) return;
    this.md.replaceChildren(renderMarkdown(parseMarkdown(this.markdownText)));
    this.follower.changed();
  }
}

// ---------------------------------------------------------------------------------------------
// Logs pane: lines; JSON lines are shown as fields; a level filter hides lower levels.

function normLevel(v) {
  if (typeof v === 'number') {
    // pino / bunyan numbers
    if (v >= 50) return 'error';
    if (v >= 40) return 'warn';
    if (v >= 30) return 'info';
    if (v >= 20) return 'debug';
    return 'trace';
  }
  if (typeof v !== 'string') return '';
  const s = v.toLowerCase();
  if (s.startsWith('warn')) return 'warn';
  if (['err', 'error', 'fatal', 'critical', 'crit', 'panic', 'alert', 'emerg'].includes(s)) return 'error';
  if (['trace', 'debug', 'info'].includes(s)) return s;
  if (s === 'notice') return 'info';
  return '';
}

class LogPane {
  constructor() {
    this.partial = '';
    this.count = 0;
    this.dropped = 0;
    this.list = el('div', { class: 'log-lines' });
    this.dropNotice = el('div', { class: 'trim-notice', hidden: true });
    this.scroller = el('div', { class: 'scroll logs-scroll', tabindex: 0, 'aria-label': 'Logs' }, this.dropNotice, this.list);
    this.followButton = el('button', { class: 'follow', type: 'button', hidden: true, text: '↓ Follow logs' });
    this.follower = new Follower(this.scroller, this.followButton);
    this.root = el('div', { class: 'pane logs-pane' }, this.scroller, this.followButton);
  }

  write(text) {
    const s = this.partial + text;
    const parts = s.split('\n');
    this.partial = parts.pop();
    if (this.partial.length > LOG_LINE_CAP) {
      parts.push(this.partial);
      this.partial = '';
    }
    for (const p of parts) this.line(p.endsWith('\r') ? p.slice(0, -1) : p);
    this.follower.changed();
  }

  marker(message) {
    this.list.appendChild(el('div', { class: 'log-line marker marker-warn', 'data-level': 'error' }, message));
    this.count++;
    this.follower.changed();
  }

  line(raw) {
    if (raw === '') return;
    const row = el('div', { class: 'log-line' });
    let level = '';
    const trimmed = raw.trim();
    let obj = null;
    if (trimmed.startsWith('{') && trimmed.endsWith('}') && trimmed.length < 256 * 1024) {
      try {
        obj = JSON.parse(trimmed);
      } catch {
        obj = null;
      }
    }
    if (obj && typeof obj === 'object' && !Array.isArray(obj)) {
      row.classList.add('json');
      const fields = { ...obj };
      const nested = fields.fields && typeof fields.fields === 'object' ? fields.fields : null;
      if (nested) {
        delete fields.fields;
        for (const [k, v] of Object.entries(nested)) if (!(k in fields)) fields[k] = v;
      }
      const take = (...keys) => {
        for (const k of keys) {
          if (k in fields) {
            const v = fields[k];
            delete fields[k];
            return v;
          }
        }
        return undefined;
      };
      level = normLevel(take('level', 'lvl', 'severity', 'levelname'));
      const time = take('timestamp', 'time', 'ts', '@timestamp');
      const msg = take('message', 'msg');
      const target = take('target', 'logger', 'name');
      if (time !== undefined) row.append(el('span', { class: 'log-time', text: clip(typeof time === 'number' ? fmtTime(time > 1e12 ? time : time * 1000) : String(time).replace(/^\d{4}-\d\d-\d\dT/, ''), 40) }));
      row.append(el('span', { class: `log-level lv-${level || 'none'}`, text: level || 'log' }));
      if (target !== undefined) row.append(el('span', { class: 'log-target', text: clip(typeof target === 'string' ? target : JSON.stringify(target), 80) }));
      if (msg !== undefined) row.append(el('span', { class: 'log-msg', text: clip(typeof msg === 'string' ? msg : JSON.stringify(msg), LOG_LINE_CAP) }));
      for (const [k, v] of Object.entries(fields)) {
        row.append(el('span', { class: 'log-field' }, el('span', { class: 'k', text: clip(k, 60) }), '=', el('span', { class: 'v', text: clip(typeof v === 'string' ? v : JSON.stringify(v), 1000) })));
      }
    } else {
      const parser = new AnsiParser();
      const segs = parser.push(raw.length > LOG_LINE_CAP ? raw.slice(0, LOG_LINE_CAP) : raw, true);
      const m = /\b(TRACE|DEBUG|INFO|WARN(?:ING)?|ERROR|FATAL|CRITICAL)\b/i.exec(plainText(segs).slice(0, 80));
      level = m ? normLevel(m[1]) : '';
      for (const s of segs) row.append(s.cls ? el('span', { class: s.cls, text: s.text }) : document.createTextNode(s.text));
      if (raw.length > LOG_LINE_CAP) row.append(el('span', { class: 'ctl', text: `… (${raw.length - LOG_LINE_CAP} more characters)` }));
    }
    row.dataset.level = level || 'none';
    this.list.appendChild(row);
    this.count++;
    while (this.count > LOG_LINES_CAP) {
      this.list.firstChild.remove();
      this.count--;
      this.dropped++;
    }
    if (this.dropped) {
      this.dropNotice.hidden = false;
      this.dropNotice.textContent = `${this.dropped} earlier log lines are not shown here (the page keeps the latest ${LOG_LINES_CAP}).`;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Authentication: when the relay answers 401, ask for a token and exchange it for an HttpOnly
// cookie (POST /api/session), which EventSource connections then carry. The token is never put
// in a URL, kept in storage, or logged.

async function apiFetch(url, opts = {}) {
  // A custom header a cross-site form cannot send; the relay requires it with cookie auth.
  const headers = { ...(opts.headers || {}), 'x-agentrun-request': '1' };
  const res = await fetch(url, { ...opts, headers, credentials: 'same-origin' });
  if (res.status === 401) showTokenPrompt();
  return res;
}

function showTokenPrompt(message) {
  if (document.getElementById('token-prompt')) return;
  const input = el('input', { type: 'password', autocomplete: 'off', 'aria-label': 'Access token' });
  input.required = true;
  const error = el('p', { class: 'token-error', text: message || '' });
  error.setAttribute('role', 'alert');
  const form = el('form', { class: 'token-prompt' },
    el('h2', { text: 'This relay needs an access token' }),
    el('p', { class: 'muted small', text: 'Ask the relay operator for a token (from its --tokens-file).' }),
    input, el('button', { type: 'submit', text: 'Sign in' }), error);
  form.id = 'token-prompt';
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const res = await fetch('/api/session', {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-agentrun-request': '1' },
      credentials: 'same-origin',
      body: JSON.stringify({ token: input.value }),
    });
    if (res.ok) {
      location.reload();
    } else {
      error.textContent = res.status === 401 ? 'That token was not accepted.' : `Sign-in failed: ${res.status}`;
      input.value = '';
    }
  });
  document.body.append(form);
  input.focus();
}

// ---------------------------------------------------------------------------------------------
// Run page

/** A random key for one control action (crypto.getRandomValues works on plain http too). */
function idempotencyKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Sends one control action. It carries an Idempotency-Key, and is sent again with the same key
 * while the relay cannot be reached or answers 5xx: the relay applies a key once, so an action
 * whose answer was lost is not applied twice.
 */
async function control(run, action, variation, data) {
  const body = { action };
  if (variation) body.variation = variation;
  if (data !== undefined) body.data = data;
  const key = idempotencyKey();
  const deadline = Date.now() + CONTROL_RETRY_MS;
  let delay = 250;
  for (;;) {
    let res = null;
    let why = '';
    try {
      res = await apiFetch(api(`/runs/${encodeURIComponent(run)}/control`), {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
        body: JSON.stringify(body),
      });
    } catch (e) {
      why = e.message || 'network error';
    }
    if (res && res.status < 500) {
      if (res.ok) return;
      let msg = `${res.status} ${res.statusText}`;
      try {
        const t = await res.text();
        if (t) msg = t.slice(0, 300);
      } catch {
        // keep the status line
      }
      throw new Error(msg);
    }
    if (res) why = `${res.status} ${res.statusText}`;
    if (Date.now() + delay > deadline) throw new Error(`not confirmed (${why}); it may or may not have been applied`);
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 2000);
  }
}

function controls(run, variation, onError) {
  const mk = (action, label, cls) => {
    const b = el('button', { type: 'button', class: `btn ${cls}`, 'data-action': action, text: label });
    b.addEventListener('click', async () => {
      if (action === 'stop' && b.dataset.confirm !== 'yes') {
        b.dataset.confirm = 'yes';
        b.textContent = 'Confirm stop';
        setTimeout(() => {
          b.dataset.confirm = '';
          b.textContent = label;
        }, 4000);
        return;
      }
      b.dataset.confirm = '';
      b.textContent = label;
      b.disabled = true;
      try {
        await control(run, action, variation);
        onError('');
      } catch (e) {
        onError(`${action} failed: ${e.message}`);
      } finally {
        b.disabled = false;
      }
    });
    return b;
  };
  return el('div', { class: 'controls' }, mk('pause', 'Pause', 'btn-pause'), mk('resume', 'Resume', 'btn-resume'), mk('stop', 'Stop', 'btn-stop'));
}

function statusDetail(st) {
  if (!st || typeof st !== 'object') return '';
  const parts = [];
  if (st.reason) parts.push(String(st.reason));
  if (st.message) parts.push(String(st.message));
  if (st.exitCode !== undefined && st.exitCode !== null) parts.push(`exit code ${st.exitCode}`);
  if (st.signal !== undefined && st.signal !== null) parts.push(`signal ${st.signal}`);
  return clip(parts.join(' · '), 500);
}

class VariationColumn {
  constructor(page, name) {
    this.name = name;
    this.state = '';
    this.output = new OutputPane();
    this.logs = new LogPane();
    this.decoders = {};
    this.badgeSlot = el('span', { class: 'badge-slot' }, badge('pending'));
    this.detail = el('div', { class: 'var-detail muted' });
    this.metrics = el('div', { class: 'metrics muted' });
    this.error = el('div', { class: 'error', hidden: true });
    const setError = (m) => {
      this.error.hidden = !m;
      this.error.textContent = m;
    };
    const mdToggle = el('button', { type: 'button', class: 'toggle md-toggle', 'aria-pressed': 'false', text: 'Markdown' });
    mdToggle.addEventListener('click', () => {
      const on = mdToggle.getAttribute('aria-pressed') !== 'true';
      mdToggle.setAttribute('aria-pressed', String(on));
      this.output.setMarkdown(on);
    });
    const rawToggle = el('button', { type: 'button', class: 'toggle raw-toggle', 'aria-pressed': 'false', title: 'Show every byte: carriage returns, escape sequences and control characters, nothing interpreted', text: 'Raw' });
    rawToggle.addEventListener('click', () => {
      const on = rawToggle.getAttribute('aria-pressed') !== 'true';
      rawToggle.setAttribute('aria-pressed', String(on));
      this.output.setRaw(on);
    });
    // A line for the agent's stdin (control action "stdin").
    const stdinInput = el('input', { type: 'text', class: 'stdin-input', placeholder: 'Send a line to the agent\'s stdin…', autocomplete: 'off', 'aria-label': `stdin of ${name}` });
    const stdinForm = el('form', { class: 'stdin' }, stdinInput, el('button', { type: 'submit', class: 'btn', text: 'Send' }));
    stdinForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      const line = stdinInput.value;
      try {
        await control(page.run, 'stdin', name, line);
        stdinInput.value = '';
        setError('');
      } catch (err) {
        setError(`stdin failed: ${err.message}`);
      }
    });
    this.root = el('section', { class: 'variation', 'data-variation': name },
      el('header', { class: 'var-head' },
        el('div', { class: 'var-title' }, el('h2', { text: name }), this.badgeSlot, controls(page.run, name, setError)),
        this.detail, this.error),
      el('div', { class: 'pane-head' }, el('h3', { text: 'Output' }), rawToggle, mdToggle,
        el('a', { class: 'toggle download', href: api(`/runs/${encodeURIComponent(page.run)}/variations/${encodeURIComponent(name)}/output`), download: `${page.run}-${name}.txt`, title: 'Download the whole output of this variation, as the agent wrote it', text: 'Download' })),
      this.output.root,
      stdinForm,
      el('div', { class: 'pane-head' }, el('h3', { text: 'Logs' })),
      this.logs.root,
      this.metrics);
  }

  setStatus(st) {
    if (!st || typeof st !== 'object' || !st.state) return;
    this.state = String(st.state).toLowerCase();
    this.badgeSlot.replaceChildren(badge(this.state));
    this.detail.textContent = statusDetail(st);
    this.root.dataset.state = this.state;
  }

  decode(env, channel) {
    if (env.encoding === 'base64') {
      const dec = (this.decoders[channel] ||= new TextDecoder('utf-8', { fatal: false }));
      let bytes;
      try {
        const bin = atob(env.content);
        bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      } catch {
        return '\ufffd';
      }
      return dec.decode(bytes, { stream: true });
    }
    const dec = this.decoders[channel];
    const rest = dec ? dec.decode() : '';
    return rest + (typeof env.content === 'string' ? env.content : '');
  }
}

class RunPage {
  constructor(app, run) {
    this.app = app;
    this.run = run;
    this.columns = new Map();
    this.lastSeq = new Map();
    this.lastId = '';
    this.ended = false;
    this.missing = false;
    this.es = null;
    this.retryMs = 1000;
    this.stats = { received: 0, duplicates: 0, connects: 0, resets: 0 };
    window.__agentrun = this.stats; // for the browser tests and for debugging

    this.runBadge = el('span', { class: 'badge-slot' }, badge('pending'));
    this.runInfo = el('div', { class: 'muted run-detail' });
    this.runDetail = el('div', { class: 'muted run-detail' });
    this.runMetrics = el('div', { class: 'metrics muted' });
    this.error = el('div', { class: 'error', hidden: true });
    this.timeline = el('ol', { class: 'timeline' });
    this.timelineCount = el('span', { class: 'muted', text: '' });
    this.grid = el('div', { class: 'grid min-trace' });
    this.notice = el('div', { class: 'notice', hidden: true });
    this.resetNotice = el('div', { class: 'reset-notice', hidden: true });
    this.resetNotice.setAttribute('role', 'status');
    const levelSelect = el('select', { 'aria-label': 'Minimum log level', onchange: (e) => {
      for (const l of LEVELS) this.grid.classList.remove(`min-${l}`);
      this.grid.classList.add(`min-${e.target.value}`);
    } }, ...LEVELS.map((l) => el('option', { value: l, text: l === 'trace' ? 'all levels' : `${l} and above` })));
    levelSelect.id = 'log-level';
    const setError = (m) => {
      this.error.hidden = !m;
      this.error.textContent = m;
    };
    const crumbs = document.getElementById('crumbs');
    crumbs.replaceChildren(el('a', { href: '/', text: 'Runs' }), el('span', { class: 'sep', text: '/' }), el('span', { text: run }));
    document.title = `${run} · agentrun`;

    app.replaceChildren(el('section', { class: 'page run-page' },
      el('div', { class: 'run-head' },
        el('div', { class: 'run-title' }, el('h1', { text: run }), this.runBadge),
        el('div', { class: 'run-actions' },
          el('label', { class: 'muted', text: 'Logs: ' }, levelSelect),
          el('span', { class: 'muted all-label', text: 'All variations:' }),
          controls(run, null, setError))),
      this.runInfo, this.runDetail, this.error, this.notice, this.resetNotice,
      el('details', { class: 'timeline-box', open: true }, el('summary', {}, 'Status timeline ', this.timelineCount), this.timeline),
      this.runMetrics,
      this.grid));
  }

  column(name) {
    const key = name || 'default';
    let c = this.columns.get(key);
    if (!c) {
      c = new VariationColumn(this, key);
      this.columns.set(key, c);
      this.grid.appendChild(c.root);
      this.grid.dataset.count = String(this.columns.size);
    }
    return c;
  }

  async loadState() {
    try {
      const res = await apiFetch(api(`/runs/${encodeURIComponent(this.run)}`), { headers: { accept: 'application/json' } });
      if (res.status === 404) {
        this.missing = true;
        this.showNotice('This run is not known to the relay (yet). Waiting for it to appear…');
        return;
      }
      if (this.missing) {
        this.missing = false;
        this.showNotice('');
      }
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const state = normalizeRun(await res.json(), this.run);
      for (const v of state.variations) this.column(v);
      for (const [v, st] of Object.entries(state.vars)) this.column(v).setStatus(st);
      this.setRunState(overallState(state));
      const parts = [];
      if (state.name) parts.push(`AgentRun ${state.namespace ? `${state.namespace}/` : ''}${state.name}`);
      if (state.created) parts.push(`created ${fmtDate(state.created)}`);
      if (state.ended) parts.push(`ended ${fmtDate(state.ended)}`);
      this.runInfo.textContent = parts.join(' · ');
    } catch (e) {
      this.showNotice(`Cannot read the run's state: ${e.message}`);
    }
  }

  showNotice(text) {
    this.notice.hidden = !text;
    this.notice.textContent = text;
  }

  setRunState(s) {
    if (s) this.runBadge.replaceChildren(badge(s));
  }

  refreshRunState() {
    const states = [...this.columns.values()].map((c) => c.state).filter(Boolean);
    if (!states.length) return;
    let s = states[0];
    for (const cand of ['failed', 'running', 'paused', 'starting', 'pending', 'stopped']) {
      if (states.includes(cand)) {
        s = cand;
        break;
      }
    }
    if (states.every((x) => x === 'succeeded')) s = 'succeeded';
    this.setRunState(s);
  }

  connect() {
    if (this.es) this.es.close();
    let url = `${api(`/runs/${encodeURIComponent(this.run)}/events`)}?channels=${CHANNELS}`;
    url += `&from=${encodeURIComponent(this.lastId || 'earliest')}`;
    const es = new EventSource(url);
    this.es = es;
    setConn('connecting', 'connecting…');
    es.onopen = () => {
      this.stats.connects++;
      this.retryMs = 1000;
      if (this.missing) this.loadState(); // the run exists now
      setConn('live', 'live');
    };
    es.onerror = () => {
      if (this.ended) return;
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error, e.g. from a proxy): reconnect ourselves from the
        // last cursor.
        setConn('down', `disconnected; retrying in ${Math.round(this.retryMs / 1000)} s`);
        setTimeout(() => {
          if (this.es === es && !this.ended) this.connect();
        }, this.retryMs);
        this.retryMs = Math.min(this.retryMs * 2, 30000);
      } else {
        setConn('down', 'reconnecting…'); // EventSource retries by itself with Last-Event-ID
      }
    };
    for (const name of EVENT_NAMES) es.addEventListener(name, (e) => this.onEvent(name, e));
    es.onmessage = (e) => this.onEvent('message', e);
  }

  onEvent(name, e) {
    if (e.lastEventId) this.lastId = e.lastEventId;
    let env = null;
    try {
      env = e.data ? JSON.parse(e.data) : null;
    } catch {
      env = null;
    }
    if (name === 'end') {
      this.ended = true;
      this.es.close();
      const phase = env && typeof env.phase === 'string' ? env.phase : '';
      if (phase) this.setRunState(phase);
      setConn('ended', env && env.finished === false ? 'stream closed' : 'run ended · all output received');
      this.loadState(); // the state hash has the final word on every variation
      return;
    }
    if (name === 'open') {
      // {run, variations: [...], phase}
      if (env && Array.isArray(env.variations)) for (const v of env.variations) if (typeof v === 'string') this.column(v);
      return;
    }
    if (name === 'shutdown') {
      // The relay is going away; EventSource reconnects with this event's id by itself.
      setConn('connecting', 'relay restarting · reconnecting…');
      return;
    }
    if (name === 'reset') {
      this.resetHistory(env);
      return;
    }
    if (name === 'trimmed' && env && typeof env === 'object') {
      // {channel, variation, wanted, firstAvailable, missed}: history was trimmed past the cursor.
      const first = Number(env.firstAvailable);
      const msg = `⚠ history trimmed: ${Number(env.missed) || 'some'} earlier entries of ${env.channel} are no longer kept (the stream now starts at entry ${first})`;
      if (Number.isFinite(first) && first > 0) {
        const key = `${env.channel}|${env.variation || ''}`;
        if ((this.lastSeq.get(key) || 0) < first - 1) this.lastSeq.set(key, first - 1);
      }
      if ((env.channel === 'output' || env.channel === 'logs') && typeof env.variation === 'string') {
        const col = this.column(env.variation);
        (env.channel === 'output' ? col.output : col.logs).marker(msg, 'info');
      } else this.addTimeline({ ts: Date.now(), state: 'notice', message: msg });
      return;
    }
    if (!env || typeof env !== 'object' || typeof env.channel !== 'string' || !Number.isFinite(env.seq)) {
      // A notice about the stream rather than an entry of it.
      if (name !== 'message' && name !== 'output' && name !== 'logs' && name !== 'status' && name !== 'metrics') this.streamNotice(name, env, e.data);
      return;
    }
    this.stats.received++;
    const key = `${env.channel}|${env.variation || ''}`;
    const last = this.lastSeq.get(key) || 0;
    if (env.seq <= last) {
      this.stats.duplicates++;
      return;
    }
    this.lastSeq.set(key, env.seq);
    const col = env.channel === 'output' || env.channel === 'logs' ? this.column(env.variation) : null;
    if (col && last > 0 && env.seq > last + 1) {
      const pane = env.channel === 'output' ? col.output : col.logs;
      pane.marker(`⚠ entries ${last + 1}–${env.seq - 1} of this stream were not received`);
    }
    const type = env.type || name;
    if (type === 'gap') {
      const m = env.meta && typeof env.meta === 'object' ? env.meta : {};
      const what = [];
      if (m.droppedBytes !== undefined) what.push(fmtBytes(m.droppedBytes));
      if (m.droppedChunks !== undefined) what.push(`${m.droppedChunks} chunks`);
      const msg = `⚠ gap: ${what.length ? what.join(', ') : 'some data'} of ${env.channel} could not be kept and ${what.length ? 'were' : 'was'} dropped here`;
      if (col) (env.channel === 'output' ? col.output : col.logs).marker(msg);
      else this.addTimeline({ ts: env.ts, variation: env.variation, state: 'gap', message: msg });
      return;
    }
    if (env.channel === 'output') col.output.write(col.decode(env, 'output'));
    else if (env.channel === 'logs') col.logs.write(col.decode(env, 'logs'));
    else if (env.channel === 'status') this.onStatus(env);
    else if (env.channel === 'metrics') this.onMetrics(env);
  }

  /**
   * `reset` ({run, reason, oldEpoch, newEpoch, message}): what the page shows does not belong to
   * the run's current history (Redis lost entries and the history was written again). Clear
   * every pane and show the history again from its first entry, which the relay sends next.
   */
  resetHistory(env) {
    this.stats.resets++;
    this.lastSeq.clear();
    for (const c of this.columns.values()) c.root.remove();
    this.columns.clear();
    this.grid.dataset.count = '0';
    this.timeline.replaceChildren();
    this.timelineCount.textContent = '';
    this.runMetrics.replaceChildren();
    const why = env && typeof env.message === 'string' ? env.message : "the run's history changed";
    this.resetNotice.hidden = false;
    this.resetNotice.textContent = `⚠ History reset at ${fmtTime(Date.now())}: ${clip(why, 600)}. Everything below is the run's history again, from its first entry.`;
    this.loadState();
  }

  streamNotice(name, env, data) {
    let text;
    if (env && typeof env === 'object') {
      text = env.message || env.reason || JSON.stringify(env);
    } else text = data || name;
    this.addTimeline({ ts: Date.now(), state: 'notice', message: `${name}: ${clip(String(text), 400)}` });
  }

  onStatus(env) {
    let st = null;
    try {
      st = JSON.parse(env.content);
    } catch {
      st = { state: 'unknown', message: env.content };
    }
    if (!st || typeof st !== 'object') return;
    const variation = st.variation || (env.variation ?? null);
    this.addTimeline({ ts: env.ts, ...st, variation });
    if (variation) {
      this.column(variation).setStatus(st);
      this.refreshRunState();
    } else if (st.state) {
      this.setRunState(String(st.state).toLowerCase());
      this.runDetail.textContent = statusDetail(st);
    }
  }

  onMetrics(env) {
    let m = null;
    try {
      m = JSON.parse(env.content);
    } catch {
      return;
    }
    if (!m || typeof m !== 'object') return;
    const target = env.variation ? this.column(env.variation).metrics : m.variation ? this.column(String(m.variation)).metrics : this.runMetrics;
    const parts = Object.entries(m)
      .filter(([k, v]) => k !== 'variation' && (typeof v === 'number' || typeof v === 'string'))
      .slice(0, 8)
      .map(([k, v]) => el('span', { class: 'metric' }, el('span', { class: 'k', text: clip(k, 40) }), ' ', el('span', { class: 'v', text: clip(/bytes/i.test(k) ? fmtBytes(v) : String(v), 40) })));
    target.replaceChildren(...parts);
  }

  addTimeline(st) {
    const li = el('li', { 'data-state': String(st.state || '') },
      el('span', { class: 'tl-time', text: fmtTime(st.ts) }),
      st.variation ? el('span', { class: 'tl-var', text: clip(String(st.variation), 63) }) : el('span', { class: 'tl-var muted', text: 'run' }),
      badge(st.state),
      el('span', { class: 'tl-detail', text: statusDetail(st) }),
      st.source ? el('span', { class: 'tl-source muted', text: clip(String(st.source), 40) }) : null);
    const tl = this.timeline;
    const stick = tl.scrollHeight - tl.scrollTop - tl.clientHeight <= 4;
    tl.appendChild(li);
    while (this.timeline.childElementCount > TIMELINE_CAP) this.timeline.firstChild.remove();
    this.timelineCount.textContent = `(${this.timeline.childElementCount})`;
    if (stick) tl.scrollTop = tl.scrollHeight; // follow the newest entry unless scrolled up
  }
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const app = document.getElementById('app');
  const m = /^\/runs\/([^/]+)\/?$/.exec(location.pathname);
  if (m) {
    let run;
    try {
      run = decodeURIComponent(m[1]);
    } catch {
      run = m[1];
    }
    const page = new RunPage(app, run);
    await page.loadState();
    page.connect();
  } else {
    await listPage(app);
  }
}

main();
