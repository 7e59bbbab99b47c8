// Terminal text for the output pane: ANSI escape sequences become CSS classes (SGR colours and
// styles) or are dropped (OSC titles and hyperlinks, DCS...), and control characters are shown
// as harmless visible symbols. Pure: produces {text, cls} segments; the caller puts them into
// the page with textContent only.
//
// Modes:
// - 'flat' (the logs pane): a lone "\r" is a line end, cursor moves are dropped.
// - 'terminal' (the output pane): carriage return, backspace, erase-in-line and cursor moves
//   become {op, n} segments that terminal.js applies to its lines, as a terminal would.
// - 'raw': nothing is interpreted; every escape sequence and control character is shown.
//
// The parser keeps state between chunks: an escape sequence or a "\r\n" cut in two by the
// chunking is joined up with the next chunk.

const MAX_PENDING = 4096; // an unterminated sequence longer than this is garbage: show it

// Bidirectional overrides and isolates can make text read differently than it is
// ("Trojan Source"); show them instead of obeying them.
const BIDI = /[\u202a-\u202e\u2066-\u2069]/;

function defaultStyle() {
  return { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false, strike: false };
}

// CSI final bytes that move the cursor or erase within the line, and the op they become.
const CURSOR_OPS = { A: 'up', B: 'down', C: 'right', D: 'left', E: 'next', F: 'prev', G: 'col', K: 'el' };

export class AnsiParser {
  /** @param {{mode?: 'flat' | 'terminal' | 'raw'}} [options] */
  constructor({ mode = 'flat' } = {}) {
    this.mode = mode;
    this.pending = '';
    this.style = defaultStyle();
  }

  /** The class list of the current style ('' when plain). */
  cls() {
    const s = this.style;
    const c = [];
    if (s.fg !== null) c.push(`a-fg${s.fg}`);
    if (s.bg !== null) c.push(`a-bg${s.bg}`);
    if (s.bold) c.push('a-b');
    if (s.dim) c.push('a-d');
    if (s.italic) c.push('a-i');
    if (s.underline) c.push('a-u');
    if (s.inverse) c.push('a-inv');
    if (s.strike) c.push('a-s');
    return c.join(' ');
  }

  /**
   * Parses the next chunk of text.
   * @param {string} text
   * @param {boolean} [final] true when no more text follows (flushes what is pending)
   * @returns {{text: string, cls: string}[]}
   */
  push(text, final = false) {
    const s = this.pending + text;
    this.pending = '';
    const out = [];
    let buf = '';
    let bufCls = this.cls();
    const emit = (t, cls) => {
      if (cls !== bufCls) {
        if (buf) out.push({ text: buf, cls: bufCls });
        buf = '';
        bufCls = cls;
      }
      buf += t;
    };
    const ctl = (t) => emit(t, 'ctl');
    const op = (name, n) => {
      if (buf) out.push({ text: buf, cls: bufCls });
      buf = '';
      out.push({ op: name, n });
    };
    const raw = this.mode === 'raw';
    const terminal = this.mode === 'terminal';
    let i = 0;
    let plainStart = 0;
    const flushPlain = (end) => {
      if (end > plainStart) emit(s.slice(plainStart, end), this.cls());
    };
    while (i < s.length) {
      const c = s.charCodeAt(i);
      const special = c < 0x20 || (c >= 0x7f && c <= 0x9f) || (c >= 0x2066 && c <= 0x2069) || (c >= 0x202a && c <= 0x202e);
      if (!special || c === 0x0a || c === 0x09) {
        i++;
        continue;
      }
      flushPlain(i);
      if (c === 0x1b) {
        const end = escapeEnd(s, i);
        if (end < 0) {
          // Incomplete: wait for the next chunk, unless this is the end or it is too long.
          if (!final && s.length - i <= MAX_PENDING) {
            this.pending = s.slice(i);
            i = s.length;
            plainStart = i;
            break;
          }
          ctl('\u241b');
          i++;
        } else if (raw) {
          ctl(`\u241b${visible(s.slice(i + 1, end))}`);
          i = end;
        } else {
          const csi = s[i + 1] === '[' ? s.slice(i + 2, end - 1) : null;
          const kind = s[end - 1];
          if (csi !== null && kind === 'm') this.sgr(csi);
          else if (terminal && csi !== null && CURSOR_OPS[kind] && /^[0-9]*$/.test(csi)) {
            const n = csi === '' ? null : Number.parseInt(csi, 10);
            op(CURSOR_OPS[kind], kind === 'K' ? (n ?? 0) : Math.max(1, n ?? 1));
          }
          i = end;
        }
      } else if (c === 0x0d) {
        if (raw) {
          ctl('\u240d');
          i++;
        } else if (i + 1 === s.length && !final) {
          this.pending = '\r';
          i++;
          plainStart = i;
          break;
        } else if (s[i + 1] === '\n') {
          emit('\n', this.cls());
          i += 2;
        } else if (terminal) {
          // Back to the start of the line: what follows overwrites it (progress bars).
          op('cr', 1);
          i++;
        } else {
          // A lone "\r" starts a new line in the flat view.
          emit('\n', this.cls());
          i++;
        }
      } else if (c === 0x08 && terminal) {
        op('left', 1);
        i++;
      } else if (c < 0x20) {
        ctl(String.fromCharCode(0x2400 + c));
        i++;
      } else if (c === 0x7f) {
        ctl('\u2421');
        i++;
      } else if (c <= 0x9f) {
        ctl(`\\x${c.toString(16)}`);
        i++;
      } else {
        ctl(`<U+${c.toString(16).toUpperCase()}>`);
        i++;
      }
      plainStart = i;
    }
    flushPlain(i);
    if (buf) out.push({ text: buf, cls: bufCls });
    return out;
  }

  sgr(params) {
    const p = params === '' ? [0] : params.split(/[;:]/).map((x) => (x === '' ? 0 : Number.parseInt(x, 10)));
    const s = this.style;
    for (let k = 0; k < p.length; k++) {
      const n = p[k];
      if (n === 0) Object.assign(s, defaultStyle());
      else if (n === 1) s.bold = true;
      else if (n === 2) s.dim = true;
      else if (n === 3) s.italic = true;
      else if (n === 4) s.underline = true;
      else if (n === 7) s.inverse = true;
      else if (n === 9) s.strike = true;
      else if (n === 22) s.bold = s.dim = false;
      else if (n === 23) s.italic = false;
      else if (n === 24) s.underline = false;
      else if (n === 27) s.inverse = false;
      else if (n === 29) s.strike = false;
      else if (n >= 30 && n <= 37) s.fg = n - 30;
      else if (n === 39) s.fg = null;
      else if (n >= 40 && n <= 47) s.bg = n - 40;
      else if (n === 49) s.bg = null;
      else if (n >= 90 && n <= 97) s.fg = n - 90 + 8;
      else if (n >= 100 && n <= 107) s.bg = n - 100 + 8;
      else if (n === 38 || n === 48) {
        // 38;5;N (256 colours: the first 16 are kept) or 38;2;R;G;B (true colour: dropped).
        let colour = null;
        if (p[k + 1] === 5) {
          colour = p[k + 2] < 16 ? p[k + 2] : null;
          k += 2;
        } else if (p[k + 1] === 2) {
          k += 4;
        }
        if (n === 38) s.fg = colour;
        else s.bg = colour;
      }
    }
  }
}

/** The index just past the escape sequence starting at s[i] (an ESC), or -1 if incomplete. */
function escapeEnd(s, i) {
  if (i + 1 >= s.length) return -1;
  const k = s[i + 1];
  if (k === '[') {
    // CSI: parameter bytes 0x30-0x3f, intermediates 0x20-0x2f, one final byte 0x40-0x7e.
    for (let j = i + 2; j < s.length; j++) {
      const c = s.charCodeAt(j);
      if (c >= 0x40 && c <= 0x7e) return j + 1;
      if (c < 0x20 || c > 0x7e) return j; // broken sequence: drop what came before
    }
    return -1;
  }
  if (k === ']' || k === 'P' || k === 'X' || k === '^' || k === '_') {
    // OSC, DCS, SOS, PM, APC: up to BEL (OSC only) or ST (ESC \).
    for (let j = i + 2; j < s.length; j++) {
      const c = s.charCodeAt(j);
      if (c === 0x07) return j + 1;
      if (c === 0x1b) {
        if (j + 1 >= s.length) return -1;
        return s[j + 1] === '\\' ? j + 2 : j;
      }
    }
    return -1;
  }
  const c = s.charCodeAt(i + 1);
  if (c >= 0x20 && c <= 0x2f) {
    // nF: intermediates then a final byte (e.g. ESC ( B).
    for (let j = i + 2; j < s.length; j++) {
      const d = s.charCodeAt(j);
      if (d >= 0x30 && d <= 0x7e) return j + 1;
      if (d < 0x20 || d > 0x7e) return j;
    }
    return -1;
  }
  if (c >= 0x30 && c <= 0x7e) return i + 2; // two-byte sequence (ESC 7, ESC c...)
  return i + 1; // ESC followed by something else: drop the ESC alone
}

/** The characters of an escape sequence's body, with control characters made visible. */
function visible(t) {
  let out = '';
  for (const ch of t) {
    const c = ch.charCodeAt(0);
    out += c < 0x20 ? String.fromCharCode(0x2400 + c) : c === 0x7f ? '\u2421' : ch;
  }
  return out;
}

/** Plain text of segments without styles (for the Markdown view and copying). */
export function plainText(segments) {
  let t = '';
  for (const s of segments) if (s.op === undefined && s.cls !== 'ctl') t += s.text;
  return t;
}

export { BIDI };
