// The output as a document of numbered lines, for the output pane (app.js). Pure: no DOM.
//
// Line N is the N-th line of the output as the agent wrote it, counted by "\n" (what `sed -n Np`
// prints of the download, and what the relay's range and search endpoints number). The pane
// keeps only some lines: blocks of BLOCK lines, each with the text it was made from (to render
// again in another mode) and its rendered rows. A block the page no longer holds is read again
// from the relay's range endpoint (`textOfLines` picks its lines out of the range pages).

import { AnsiParser } from './ansi.js';
import { Screen } from './terminal.js';

export const BLOCK = 256; // lines per block

/** The block that holds line `n` (from 1). */
export function blockOf(n) {
  return Math.floor((n - 1) / BLOCK);
}

/** The first and last line of block `k`. */
export function blockLines(k) {
  return [k * BLOCK + 1, (k + 1) * BLOCK];
}

const HASH = /^#([a-z0-9](?:[-a-z0-9.]*[a-z0-9])?):L(\d{1,12})(?:-L?(\d{1,12}))?$/i;

/** `#VARIATION:L12` or `#VARIATION:L12-L20` → {variation, from, to}; anything else → null. */
export function parseLineHash(hash) {
  const m = HASH.exec(hash || '');
  if (!m) return null;
  const a = Number(m[2]);
  const b = m[3] ? Number(m[3]) : a;
  if (a < 1 || b < 1) return null;
  return { variation: m[1], from: Math.min(a, b), to: Math.max(a, b) };
}

/** The fragment that links to lines `from`..`to` of a variation's output. */
export function lineHash(variation, from, to = from) {
  return to > from ? `#${variation}:L${from}-L${to}` : `#${variation}:L${from}`;
}

/** What the pane shows for a gap entry (output that never reached Redis). */
export function gapMessage(channel, meta) {
  const m = meta && typeof meta === 'object' ? meta : {};
  const what = [];
  if (m.droppedBytes !== undefined) what.push(fmtBytes(m.droppedBytes));
  if (m.droppedChunks !== undefined) what.push(`${m.droppedChunks} chunks`);
  return `⚠ gap: ${what.length ? what.join(', ') : 'some data'} of ${channel} could not be kept and ${what.length ? 'were' : 'was'} dropped here`;
}

export function fmtBytes(n) {
  const v = Number(n);
  if (!Number.isFinite(v)) return String(n);
  if (v < 1024) return `${v} B`;
  if (v < 1024 * 1024) return `${(v / 1024).toFixed(1)} KiB`;
  return `${(v / 1024 / 1024).toFixed(1)} MiB`;
}

/** Decodes the content of entries in order (base64 ones are bytes; UTF-8 split across entries joins up). */
export class EntryDecoder {
  constructor() {
    this.dec = new TextDecoder('utf-8', { fatal: false });
  }

  decode(env) {
    if (env.encoding === 'base64') {
      let bytes;
      try {
        const bin = atob(env.content);
        bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      } catch {
        return '\ufffd';
      }
      return this.dec.decode(bytes, { stream: true });
    }
    return this.dec.decode() + (typeof env.content === 'string' ? env.content : '');
  }
}

/**
 * Collects lines `from`..`to` from range pages, fed in order: `add(page)` for each page, until
 * `done`. `items` is then their text (each line with its "\n") and gap markers, in order.
 */
export class LineCollector {
  constructor(from, to) {
    this.from = from;
    this.to = to;
    this.line = null; // the line the next byte belongs to
    this.items = [];
    this.done = false;
    this.decoder = new EntryDecoder();
  }

  add(page) {
    for (const e of page.entries || []) {
      if (this.done) break;
      if (this.line === null) this.line = Number(e.line) || 1;
      if (e.type === 'gap') {
        if (this.line >= this.from) this.items.push({ marker: gapMessage('output', e.meta), kind: 'warn' });
        continue;
      }
      this.text(this.decoder.decode(e));
    }
    if (!page.moreAfter) this.done = true;
  }

  text(t) {
    let start = 0;
    while (start < t.length && !this.done) {
      const nl = t.indexOf('\n', start);
      const end = nl < 0 ? t.length : nl + 1;
      if (this.line >= this.from) this.push(t.slice(start, end));
      if (nl < 0) break;
      this.line++;
      if (this.line > this.to) this.done = true;
      start = end;
    }
  }

  push(text) {
    const last = this.items[this.items.length - 1];
    if (typeof last === 'string' && last.length < 64 * 1024) this.items[this.items.length - 1] = last + text;
    else this.items.push(text);
  }
}

/**
 * Renders items (text and markers) of the lines from `firstLine` on, as the output pane shows
 * them in `mode` ('terminal' or 'raw'): rows in order, each a Screen line ({text, runs, nl, n})
 * or a marker ({marker, kind, n}). Returns the screen and parser too, to go on writing.
 */
export function renderItems(items, { mode, firstLine, maxLine }) {
  const parser = new AnsiParser({ mode });
  const screen = new Screen({ firstLine, maxLine, liveLines: 200 });
  const rows = [];
  const place = ({ changed }) => {
    for (const line of changed) {
      if (!line.placed) {
        line.placed = true;
        rows.push(line);
      }
    }
  };
  place({ changed: [screen.lines[0]] });
  for (const item of items) {
    if (typeof item === 'string') place(screen.apply(parser.push(item)));
    else {
      screen.freezeAll();
      rows.push({ marker: item.marker, kind: item.kind, n: screen.line });
      place({ changed: [screen.lines[0]] });
    }
  }
  return { rows, screen, parser };
}
