// The agentrun web UI: a run list at "/" and a run page at "/runs/{run}".
//
// Agent output, logs, status messages and metrics are untrusted: they only ever reach the page
// through textContent / createTextNode (see el() below) or the Markdown renderer, which builds
// DOM nodes the same way. Nothing here uses innerHTML, and the relay's Content-Security-Policy
// forbids inline scripts on top of that.

import { AnsiParser, plainText } from './ansi.js';
import { runsOf } from './terminal.js';
import { blockOf, blockLines, parseLineHash, lineHash, gapMessage, fmtBytes, EntryDecoder, LineCollector, renderItems } from './lines.js';
import { parse as parseMarkdown, render as renderMarkdown } from './markdown.js';

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
    else if (k === 'role') e.setAttribute('role', v);
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

const LIST_PAGE = 50; // runs asked for per page of the run list
const LIST_REFRESH_MS = 5000;
const PHASES = ['pending', 'running', 'succeeded', 'failed', 'stopped'];
// The list's filters, as the relay's `GET /api/runs` takes them and the page's URL keeps them.
const LIST_FILTERS = ['namespace', 'phase', 'name'];

/** The run list's filters from a URL query (`?namespace=…&phase=…&name=…`). */
function listFilters(search) {
  const q = new URLSearchParams(search);
  const f = {};
  for (const k of LIST_FILTERS) {
    const v = (q.get(k) || '').trim();
    if (v) f[k] = v;
  }
  return f;
}

function listUrl(filters, after) {
  const q = new URLSearchParams({ limit: String(LIST_PAGE), ...filters });
  if (after) q.set('after', after);
  return `${api('/runs')}?${q}`;
}

function runRow(run) {
  const link = el('a', { href: `/runs/${encodeURIComponent(run.id)}`, text: run.id });
  const vars = el('span', { class: 'vars' }, ...run.variations.map((v) => el('span', { class: 'var-chip' }, v, ' ', badge(run.vars[v] && run.vars[v].state))));
  const owner = run.name ? el('div', { class: 'muted small', text: run.namespace ? `${run.namespace}/${run.name}` : run.name }) : null;
  const archived = run.archived ? el('span', { class: 'chip archived', title: 'Redis has let this run go; it is read from the archive', text: 'archived' }) : null;
  return el('tr', { 'data-run': run.id, 'data-archived': run.archived ? 'true' : 'false' },
    el('td', {}, link, owner), el('td', {}, badge(overallState(run)), archived ? ' ' : null, archived), el('td', {}, vars), el('td', { class: 'muted', text: fmtDate(run.created) }));
}

/**
 * The run list: live runs and, with an archive, the runs Redis has let go, newest first.
 * Filters (namespace, phase, part of the name) are kept in the page's URL; "Older runs" reads
 * the next page. The first page refreshes every few seconds; once older pages are shown the
 * list stays as it is until the user goes back to the newest runs.
 */
async function listPage(app) {
  document.title = 'Runs · agentrun';
  let filters = listFilters(location.search);
  let next = null;
  let pages = 0;
  let timer = null;
  const tbody = el('tbody');
  const info = el('p', { class: 'empty', text: 'Loading runs…' });
  const table = el('table', { class: 'runs', hidden: true },
    el('thead', {}, el('tr', {}, el('th', { text: 'Run' }), el('th', { text: 'State' }), el('th', { text: 'Variations' }), el('th', { text: 'Created' }))),
    tbody);
  const nsInput = el('input', { class: 'filter-input', type: 'search', placeholder: 'namespace', autocomplete: 'off', 'aria-label': 'Namespace', value: filters.namespace || '' });
  const nameInput = el('input', { class: 'filter-input', type: 'search', placeholder: 'name contains', autocomplete: 'off', 'aria-label': 'Name contains', value: filters.name || '' });
  const phaseSelect = el('select', { 'aria-label': 'Phase' }, el('option', { value: '', text: 'any phase' }), ...PHASES.map((p) => el('option', { value: p, text: p })));
  phaseSelect.value = filters.phase || '';
  const form = el('form', { class: 'filters', role: 'search' }, nsInput, phaseSelect, nameInput, el('button', { class: 'btn', type: 'submit', text: 'Filter' }));
  const more = el('button', { class: 'btn more', type: 'button', hidden: true, text: 'Older runs' });
  const paused = el('p', { class: 'muted small paused', hidden: true }, 'Older runs are shown: the list no longer refreshes. ',
    el('button', { class: 'btn newest', type: 'button', text: 'Back to the newest runs' }));
  app.replaceChildren(el('section', { class: 'page' }, el('h1', { text: 'Runs' }), form, paused, info, table, el('p', { class: 'list-more' }, more)));

  const load = async (after) => {
    try {
      const res = await apiFetch(listUrl(filters, after), { headers: { accept: 'application/json' } });
      if (!res.ok) {
        let why = `${res.status} ${res.statusText}`;
        try {
          const body = await res.json();
          if (body && typeof body.error === 'string') why = body.error;
        } catch {
          // not JSON: the status says it
        }
        throw new Error(why);
      }
      const body = await res.json();
      const list = Array.isArray(body) ? body : body.runs || body.items || [];
      const runs = list.map((r) => {
        const run = normalizeRun(typeof r === 'string' ? { run: r } : r);
        run.archived = r && r.archived === true;
        return run;
      });
      const rows = runs.map(runRow);
      if (after) tbody.append(...rows);
      else tbody.replaceChildren(...rows);
      next = body && typeof body.next === 'string' && body.next ? body.next : null;
      pages = after ? pages + 1 : 1;
      more.hidden = !next;
      paused.hidden = pages <= 1;
      const any = tbody.childElementCount > 0;
      table.hidden = !any;
      info.hidden = any;
      info.textContent = Object.keys(filters).length
        ? 'No runs match these filters.'
        : 'No runs yet. Start one with `agentrun-sidecar run -- COMMAND` or by creating an AgentRun.';
      setConn('live', 'connected');
    } catch (e) {
      info.hidden = false;
      info.textContent = `Cannot list runs: ${e.message}`;
      setConn('down', 'relay unreachable');
    }
  };
  const newest = async () => {
    next = null;
    await load(null);
  };
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    filters = {};
    for (const [k, v] of [['namespace', nsInput.value], ['phase', phaseSelect.value], ['name', nameInput.value]]) {
      if (v.trim()) filters[k] = v.trim();
    }
    const q = new URLSearchParams(filters).toString();
    history.replaceState(null, '', q ? `/?${q}` : '/');
    newest();
  });
  phaseSelect.addEventListener('change', () => form.requestSubmit());
  more.addEventListener('click', () => {
    if (next) load(next);
  });
  paused.querySelector('button').addEventListener('click', newest);
  await newest();
  timer = setInterval(() => {
    if (!document.hidden && pages <= 1) load(null);
  }, LIST_REFRESH_MS);
  return timer;
}

// ---------------------------------------------------------------------------------------------
// Auto-scroll: follows the bottom until the user scrolls up; scrolling back down resumes.

class Follower {
  constructor(scroller, button) {
    this.scroller = scroller;
    this.button = button;
    this.stuck = true;
    this.held = false; // the page moved the view (a link, a search match): stay until the user moves it
    this.lastTop = 0;
    this.pending = false;
    scroller.addEventListener('scroll', () => {
      const top = scroller.scrollTop;
      if (this.held) this.stuck = false;
      else if (this.atBottom()) this.stuck = true;
      else if (top < this.lastTop - 1) this.stuck = false;
      this.lastTop = top;
      this.button.hidden = this.stuck;
    });
    for (const ev of ['wheel', 'mousedown', 'keydown', 'touchstart']) scroller.addEventListener(ev, () => {
      this.held = false;
    }, { passive: true });
    scroller.addEventListener('wheel', (e) => {
      if (e.deltaY < 0 && scroller.scrollTop > 0) {
        this.stuck = false;
        this.button.hidden = false;
      }
    }, { passive: true });
    button.addEventListener('click', () => {
      this.held = false;
      this.stuck = true;
      this.button.hidden = true;
      this.now();
    });
  }

  /** The page moves the view: it stays there, not following, until the user scrolls. */
  hold() {
    this.held = true;
    this.stuck = false;
    this.button.hidden = false;
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
// Output pane: the variation's output as numbered lines (lines.js), as a terminal shows them
// (terminal.js) or with every byte made visible (raw); a Markdown view of the latest output.
//
// Virtualized: the scroll area is as tall as the whole output, but only the rows in view (and
// OVERSCAN on each side) are in the DOM, and only some blocks of lines are kept in memory. The
// live tail arrives over SSE and is written as it comes; a block that is not kept is read again
// from the relay's range endpoint when it comes into view, so the whole output can be scrolled
// back to its first line, searched (search endpoint), and linked to (#VARIATION:L12-L20).

const ROW_H = 18; // px: the height of a row (.term .row in style.css)
const OVERSCAN = 60; // rows rendered above and below the view
const MAX_BLOCKS = 40; // blocks of lines kept in memory (BLOCK lines each)
const RAW_BUDGET = 8 * 1024 * 1024; // characters of output text kept to render again
const BLOCK_RAW_CAP = 1024 * 1024; // characters of text kept for one block
const LINE_CAP = 128 * 1024; // characters of one line shown (an over-long line loses its start)
const RANGE_LIMIT = 500; // entries asked for per range page

class OutputPane {
  constructor(run, variation) {
    this.run = run;
    this.variation = variation;
    this.base = api(`/runs/${encodeURIComponent(run)}/variations/${encodeURIComponent(variation)}/output`);
    this.raw = false;
    this.markdownText = '';
    this.markdownMode = false;
    this.markdownTimer = null;
    this.ended = false;
    this.highlight = null; // {from, to}: linked lines or the current search match
    this.pendingJump = null;
    this.frame = 0;
    this.shown = new Set();
    this.fetching = new Map();
    this.trimNotice = el('div', { class: 'trim-notice', hidden: true });
    this.top = el('div', { class: 'spacer' });
    this.bottom = el('div', { class: 'spacer' });
    this.term = el('pre', { class: 'term' });
    this.md = el('div', { class: 'markdown', hidden: true });
    // The spacers stand for the lines above and below the rows in the DOM.
    this.scroller = el('div', { class: 'scroll output-scroll', tabindex: 0, 'aria-label': 'Output' }, this.trimNotice, this.top, this.term, this.bottom, this.md);
    this.followButton = el('button', { class: 'follow', type: 'button', hidden: true, text: '↓ Follow output' });
    this.follower = new Follower(this.scroller, this.followButton);
    this.root = el('div', { class: 'pane output-pane' }, this.scroller, this.followButton);
    this.search = new OutputSearch(this);
    this.scroller.addEventListener('scroll', () => this.schedule());
    window.addEventListener('resize', () => this.schedule());
    this.term.addEventListener('click', (e) => this.onLineClick(e));
    this.reset();
  }

  /** Starts over: no lines, a new live screen at line 1. */
  reset() {
    this.blocks = new Map();
    this.rawSize = 0;
    this.line = 1; // the output line being written live
    this.known = 0; // lines the relay said the output has (learnTotal)
    this.dropped = 0;
    this.startLive(renderItems([], { mode: this.mode(), firstLine: 1, maxLine: LINE_CAP }), 0);
  }

  mode() {
    return this.raw ? 'raw' : 'terminal';
  }

  /** Takes a rendering's screen and parser as the live ones, its rows into block `k`. */
  startLive({ rows, screen, parser }, k) {
    this.screen = screen;
    this.parser = parser;
    const b = this.block(k);
    for (const r of rows) if (!b.rows.includes(r)) b.rows.push(r);
  }

  block(k) {
    let b = this.blocks.get(k);
    if (!b) {
      b = { k, items: [], size: 0, rows: [] };
      this.blocks.set(k, b);
    }
    return b;
  }

  /** Keeps output text (or a marker) of line `n`, to render it again in another mode. */
  keep(n, item) {
    const b = this.block(blockOf(n));
    if (!b.items) return;
    const len = typeof item === 'string' ? item.length : item.marker.length;
    const last = b.items[b.items.length - 1];
    if (typeof item === 'string' && typeof last === 'string' && last.length < 64 * 1024) b.items[b.items.length - 1] = last + item;
    else b.items.push(item);
    b.size += len;
    this.rawSize += len;
    if (b.size > BLOCK_RAW_CAP) {
      // Too much to keep for one block (a huge line): it is read from the relay if needed.
      this.rawSize -= b.size;
      b.items = null;
      b.size = 0;
    }
  }

  write(text) {
    if (!text) return;
    let start = 0;
    for (;;) {
      const nl = text.indexOf('\n', start);
      const end = nl < 0 ? text.length : nl + 1;
      if (end > start) this.keep(this.line, text.slice(start, end));
      if (nl < 0) break;
      this.line++;
      start = end;
      const b = this.blocks.get(blockOf(this.line));
      if (b && b.ahead) {
        // The stream reached a block read ahead of it: the stream's own rendering replaces it.
        this.rawSize -= b.size;
        this.blocks.delete(b.k);
      }
    }
    const segs = this.parser.push(text);
    this.place(this.screen.apply(segs));
    this.markdownText += plainText(segs);
    if (this.markdownText.length > MARKDOWN_CAP * 1.25) this.markdownText = this.markdownText.slice(-MARKDOWN_CAP);
    this.changed();
  }

  /** Puts new lines of the live screen into their blocks and marks changed ones for painting. */
  place({ changed }) {
    for (const line of changed) {
      if (!line.placed) {
        line.placed = true;
        this.block(blockOf(line.n)).rows.push(line);
      }
      line.dirty = true;
    }
    if (this.screen.dropped) {
      this.dropped += this.screen.dropped;
      this.screen.dropped = 0;
      this.trimNotice.hidden = false;
      this.trimNotice.textContent = `${fmtBytes(this.dropped)} at the start of over-long lines is not shown here (the page shows the last ${fmtBytes(LINE_CAP)} of a line); Download has every byte.`;
    }
    this.evict();
  }

  /** A visible notice inside the output (gap, missing entries, trimmed history...). */
  marker(message, kind = 'warn') {
    this.keep(this.line, { marker: message, kind });
    this.screen.freezeAll();
    this.block(blockOf(this.line)).rows.push({ marker: message, kind, n: this.line });
    this.place({ changed: [this.screen.lines[0]] });
    this.markdownText += `\n\n> ${message}\n\n`;
    this.changed();
  }

  /** Lines in the scroll area: every output line up to the one being written. */
  total() {
    return Math.max(this.line, this.known);
  }

  /**
   * Asks the relay how many lines the output has (the newest range page), so that a link or a
   * search match past what the event stream has brought so far can be gone to at once.
   */
  learnTotal() {
    if (this.learning || this.ended) return;
    this.learning = (async () => {
      const res = await apiFetch(`${this.base}/range?limit=1`, { headers: { accept: 'application/json' } });
      if (!res.ok) return;
      const page = await res.json();
      if (Number.isFinite(page.nextLine)) this.known = Math.max(this.known, page.nextLine);
      const p = this.pendingJump;
      if (p && p.from < this.total()) this.jumpTo(p.from, p.to);
    })().catch(() => {}).finally(() => {
      this.learning = null;
    });
  }

  /** The live block and the ones next to it stay; others go, the farthest from the view first. */
  evict() {
    const keepFrom = blockOf(this.line) - 1;
    const center = this.follower.stuck ? keepFrom : blockOf(this.viewLine());
    while (this.blocks.size > MAX_BLOCKS || this.rawSize > RAW_BUDGET) {
      let far = null;
      for (const k of this.blocks.keys()) {
        if (k >= keepFrom && k <= keepFrom + 2) continue;
        if (far === null || Math.abs(k - center) > Math.abs(far - center)) far = k;
      }
      if (far === null) return;
      const b = this.blocks.get(far);
      this.rawSize -= b.size;
      this.blocks.delete(far);
    }
  }

  /** The line at the top of the view. */
  viewLine() {
    return Math.max(1, Math.floor((this.scroller.scrollTop - this.top.offsetTop) / ROW_H) + 1);
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    if (this.markdownMode) return;
    const total = this.total();
    const rows = Math.ceil(this.scroller.clientHeight / ROW_H);
    // Following: the last lines, wherever the scroll position is until it catches up.
    const top = this.follower.stuck ? Math.max(1, total - rows) : this.viewLine();
    const first = Math.max(1, top - OVERSCAN);
    const last = Math.min(total, top + rows + OVERSCAN);
    const nodes = [];
    const shown = new Set();
    for (let k = blockOf(first); k <= blockOf(last); k++) {
      const b = this.blocks.get(k);
      if (b) {
        for (const row of b.rows) {
          if (row.n < first || row.n > last) continue;
          nodes.push(this.rowNode(row));
          shown.add(row);
        }
        continue;
      }
      const [a, z] = blockLines(k);
      for (let n = Math.max(a, first); n <= Math.min(z, last); n++) nodes.push(el('div', { class: 'row pending', 'data-line': n }, el('span', { class: 'ln', 'data-n': n }), '…\n'));
      this.fetchBlock(k);
    }
    for (const row of this.shown) if (!shown.has(row)) row.node = null;
    this.shown = shown;
    this.root.dataset.lines = String(total); // for the browser tests and for debugging
    this.top.style.height = `${(first - 1) * ROW_H}px`;
    this.bottom.style.height = `${Math.max(0, total - last) * ROW_H}px`;
    // Rows that stay are not moved (a click or a text selection on them goes on undisturbed).
    const now = this.term.childNodes;
    if (nodes.length !== now.length || nodes.some((n, i) => n !== now[i])) this.term.replaceChildren(...nodes);
  }

  rowNode(row) {
    const hl = !row.marker && this.highlight && row.n >= this.highlight.from && row.n <= this.highlight.to;
    if (row.node && !row.dirty && row.hl === hl) return row.node;
    row.dirty = false;
    row.hl = hl;
    if (row.marker) {
      row.node = el('span', { class: `marker marker-${row.kind}` }, row.marker);
      return row.node;
    }
    const parts = runsOf(row).map((r) => (r.cls ? el('span', { class: r.cls }, r.text) : document.createTextNode(r.text)));
    if (row.nl) parts.push('\n');
    row.node = el('div', { class: hl ? 'row hl' : 'row', 'data-line': row.n },
      el('span', { class: 'ln', 'data-n': row.n, title: `Link to line ${row.n} (Shift: a range)` }), ...parts);
    return row.node;
  }

  /** Reads block `k` from the relay's range endpoint (a block the page no longer holds). */
  fetchBlock(k) {
    // The live block, the one before it and the one after it are written by the event stream,
    // until the run ends. A block further ahead (a link or a search match past what the stream
    // has brought so far) is read, and given up when the stream reaches it.
    const liveK = blockOf(this.line);
    if (this.fetching.has(k) || (Math.abs(k - liveK) <= 1 && !this.ended)) return;
    const ahead = k > liveK + 1 && !this.ended;
    const [a, z] = blockLines(k);
    const mode = this.mode();
    const job = (async () => {
      const lines = new LineCollector(a, z);
      let url = `${this.base}/range?line=${a}&limit=${RANGE_LIMIT}`;
      for (let pages = 0; pages < 1000 && !lines.done; pages++) {
        const res = await apiFetch(url, { headers: { accept: 'application/json' } });
        if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
        const page = await res.json();
        lines.add(page);
        if (!(page.entries || []).length) break;
        url = `${this.base}/range?after=${page.nextSeq}&limit=${RANGE_LIMIT}`;
      }
      if (mode !== this.mode() || this.blocks.has(k)) return; // the view changed meanwhile
      const { rows } = renderItems(lines.items, { mode, firstLine: a, maxLine: LINE_CAP });
      const b = this.block(k);
      b.ahead = ahead;
      b.rows = rows;
      b.items = lines.items;
      b.size = lines.items.reduce((s, i) => s + (typeof i === 'string' ? i.length : i.marker.length), 0);
      this.rawSize += b.size;
      this.evict();
      this.schedule();
    })();
    this.fetching.set(k, job);
    job.catch((e) => {
      this.trimNotice.hidden = false;
      this.trimNotice.textContent = `Cannot load lines ${a}–${z} from the relay: ${e.message}. Scroll again to retry.`;
    }).finally(() => setTimeout(() => this.fetching.delete(k), 0));
  }

  /**
   * The text of lines `from`..`to` as the pane shows them (markers included), from the blocks
   * it holds; null when it does not hold them all. For the browser tests and for debugging.
   */
  textOf(from = 1, to = this.line) {
    let out = '';
    for (let k = blockOf(from); k <= blockOf(to); k++) {
      const b = this.blocks.get(k);
      if (!b) return null;
      for (const row of b.rows) {
        if (row.n < from || row.n > to) continue;
        out += row.marker ? row.marker : row.text + (row.nl ? '\n' : '');
      }
    }
    return out;
  }

  /** Raw: every byte visible, nothing interpreted; otherwise as a terminal shows it. */
  setRaw(on) {
    if (on === this.raw) return;
    this.raw = on;
    this.renderAgain();
  }

  /** Renders every kept block again in the current mode; blocks without their text are dropped (read again when needed). */
  renderAgain() {
    const mode = this.mode();
    const liveK = blockOf(this.line);
    let live = null;
    for (const [k, b] of [...this.blocks]) {
      if (!b.items) {
        this.blocks.delete(k);
        continue;
      }
      const r = renderItems(b.items, { mode, firstLine: blockLines(k)[0], maxLine: LINE_CAP });
      b.rows = r.rows;
      if (k === liveK) live = r;
    }
    if (live) {
      this.screen = live.screen;
      this.parser = live.parser;
    } else {
      // The live block's text was too large to keep: the live view goes on from here.
      this.startLive(renderItems([], { mode, firstLine: this.line, maxLine: LINE_CAP }), liveK);
    }
    for (const row of this.shown) row.node = null;
    this.render();
    this.follower.changed();
  }

  setMarkdown(on) {
    this.markdownMode = on;
    this.term.hidden = on;
    this.top.hidden = on;
    this.bottom.hidden = on;
    this.md.hidden = !on;
    if (on) this.renderMarkdown();
    else {
      this.md.replaceChildren();
      this.render();
    }
    this.follower.changed();
  }

  changed() {
    if (this.markdownMode && !this.markdownTimer) {
      this.markdownTimer = setTimeout(() => {
        this.markdownTimer = null;
        this.renderMarkdown();
      }, 250);
    }
    this.schedule();
    this.follower.changed();
    if (this.pendingJump && this.pendingJump.from < this.total()) this.jumpTo(this.pendingJump.from, this.pendingJump.to);
  }

  renderMarkdown() {
    if (!this.markdownMode) return;
    this.md.replaceChildren(renderMarkdown(parseMarkdown(this.markdownText)));
    this.follower.changed();
  }

  /** The run ended: nothing more comes; a pending jump goes to the last line at most. */
  end() {
    this.ended = true;
    this.schedule(); // blocks not kept near the end can be read from the relay now
    if (this.pendingJump) this.jumpTo(Math.min(this.pendingJump.from, this.line), Math.min(this.pendingJump.to, this.line));
  }

  /**
   * Shows lines `from`..`to` highlighted, a third down the view; stops following. A line the
   * page has not received yet is gone to when it arrives.
   */
  jumpTo(from, to = from) {
    this.highlight = { from, to };
    if (from >= this.total() && !this.ended) {
      this.pendingJump = { from, to };
      this.learnTotal();
      return;
    }
    this.pendingJump = null;
    this.follower.hold();
    this.render(); // the scroll area as tall as the lines so far, or the position is cut short
    const top = this.top.offsetTop + (from - 1) * ROW_H - Math.floor(this.scroller.clientHeight / 3);
    this.scroller.scrollTop = Math.max(0, top);
    this.follower.lastTop = this.scroller.scrollTop;
    this.render();
  }

  onLineClick(e) {
    const a = e.target.closest && e.target.closest('.ln');
    if (!a) return;
    e.preventDefault();
    const n = Number(a.dataset.n);
    let from = n;
    let to = n;
    if (e.shiftKey && this.highlight) {
      from = Math.min(this.highlight.from, n);
      to = Math.max(this.highlight.to, n);
    }
    history.replaceState(null, '', lineHash(this.variation, from, to));
    this.highlight = { from, to };
    this.render();
  }
}

/**
 * The output pane's search box: asks the relay's search endpoint (the whole output, not only
 * what the page holds), and goes to the next or previous match.
 */
class OutputSearch {
  constructor(pane) {
    this.pane = pane;
    this.matches = [];
    this.index = -1;
    this.query = '';
    this.abort = null;
    this.input = el('input', { type: 'search', class: 'out-search-input', placeholder: 'Search output', autocomplete: 'off', 'aria-label': `Search the output of ${pane.variation}` });
    this.status = el('span', { class: 'out-search-status muted', 'aria-live': 'polite' });
    const prev = el('button', { type: 'button', class: 'btn out-search-prev', title: 'Previous match (Shift+Enter)', text: '↑' });
    const next = el('button', { type: 'button', class: 'btn out-search-next', title: 'Next match (Enter)', text: '↓' });
    prev.addEventListener('click', () => this.go(-1));
    next.addEventListener('click', () => this.go(1));
    this.root = el('form', { class: 'out-search' }, this.input, prev, next, this.status);
    this.root.setAttribute('role', 'search');
    this.root.addEventListener('submit', (e) => {
      e.preventDefault();
      this.go(1);
    });
    this.input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && e.shiftKey) {
        e.preventDefault();
        this.go(-1);
      }
    });
  }

  /** Next (+1) or previous (-1) match; a new query is searched first. */
  async go(dir) {
    const q = this.input.value;
    if (!q) return;
    if (q !== this.query) {
      await this.run(q);
      if (!this.matches.length) return;
      // The first match from the line in view on.
      const at = this.pane.viewLine();
      const i = this.matches.findIndex((m) => m.line >= at);
      this.index = dir > 0 ? (i < 0 ? 0 : i) : (i <= 0 ? this.matches.length - 1 : i - 1);
    } else {
      if (!this.matches.length) return;
      this.index = (this.index + dir + this.matches.length) % this.matches.length;
    }
    this.show();
  }

  show() {
    const m = this.matches[this.index];
    this.status.textContent = `${this.index + 1} of ${this.matches.length}${this.complete ? '' : '+'}`;
    this.status.title = this.note || '';
    this.pane.jumpTo(m.line);
  }

  async run(q) {
    if (this.abort) this.abort.abort();
    const abort = new AbortController();
    this.abort = abort;
    this.query = q;
    this.matches = [];
    this.index = -1;
    this.complete = false;
    this.note = '';
    this.status.textContent = 'searching…';
    try {
      const res = await apiFetch(`${this.pane.base}/search?q=${encodeURIComponent(q)}`, { signal: abort.signal });
      if (!res.ok) {
        let msg = `${res.status} ${res.statusText}`;
        try {
          msg = (await res.json()).error || msg;
        } catch {
          // keep the status line
        }
        this.status.textContent = clip(msg, 200);
        this.query = '';
        return;
      }
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const rec = JSON.parse(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
          if (rec.done) {
            this.complete = rec.complete === true;
            this.note = rec.message || '';
          } else if (Number.isFinite(rec.line)) this.matches.push(rec);
        }
      }
      this.status.textContent = this.matches.length ? `${this.matches.length}${this.complete ? '' : '+'} matches` : 'no match';
    } catch (e) {
      if (abort.signal.aborted) return;
      this.status.textContent = `search failed: ${e.message}`;
      this.query = '';
    }
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

/** Disables the control buttons and stdin boxes under `root`: the run has ended. */
function closeControls(root) {
  for (const e of root.querySelectorAll('.controls button, form.stdin input, form.stdin button')) {
    e.disabled = true;
    e.title = 'The run has ended';
  }
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
    this.output = new OutputPane(page.run, name);
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
      el('div', { class: 'pane-head output-head' }, el('h3', { text: 'Output' }), this.output.search.root, rawToggle, mdToggle,
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
    return (this.decoders[channel] ||= new EntryDecoder()).decode(env);
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
    this.finished = false; // the run reached a final phase (its `end` said so)
    this.missing = false;
    this.es = null;
    this.retryMs = 1000;
    this.stats = { received: 0, duplicates: 0, connects: 0, resets: 0 };
    window.__agentrun = this.stats; // for the browser tests and for debugging
    // What an output pane holds, and its lines in memory (see OutputPane.textOf).
    this.stats.lines = (v) => this.columns.get(v)?.output.line;
    this.stats.text = (v, from, to) => this.columns.get(v)?.output.textOf(from, to) ?? null;
    // A link to lines of a variation's output (#VARIATION:L12-L20) opens there.
    this.link = parseLineHash(location.hash);
    window.addEventListener('hashchange', () => {
      this.link = parseLineHash(location.hash);
      if (this.link && this.columns.has(this.link.variation)) this.columns.get(this.link.variation).output.jumpTo(this.link.from, this.link.to);
    });

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
      if (this.link && this.link.variation === key) c.output.jumpTo(this.link.from, this.link.to);
      if (this.ended) c.output.end();
      if (this.finished) closeControls(c.root);
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
      const raw = await res.json();
      const state = normalizeRun(raw, this.run);
      for (const v of state.variations) this.column(v);
      for (const [v, st] of Object.entries(state.vars)) this.column(v).setStatus(st);
      this.setRunState(overallState(state));
      const parts = [];
      if (state.name) parts.push(`AgentRun ${state.namespace ? `${state.namespace}/` : ''}${state.name}`);
      if (state.created) parts.push(`created ${fmtDate(state.created)}`);
      if (state.ended) parts.push(`ended ${fmtDate(state.ended)}`);
      if (raw && raw.archived === true) parts.push('read from the archive');
      this.runInfo.textContent = parts.join(' · ');
      this.app.dataset.archived = raw && raw.archived === true ? 'true' : 'false';
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
      for (const c of this.columns.values()) c.output.end();
      const phase = env && typeof env.phase === 'string' ? env.phase : '';
      if (phase) this.setRunState(phase);
      // A finished run's agents are gone: nothing left to pause, resume, stop or type to.
      this.finished = env ? env.finished !== false : true;
      if (this.finished) closeControls(document);
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
      const msg = gapMessage(env.channel, env.meta);
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
