// The output pane's lines, as a terminal shows them: a carriage return goes back to the start
// of the line and what follows overwrites it, erase-in-line clears, backspace and cursor moves
// go left, right, up and down within the recent lines (multi-line progress bars). Pure: it
// takes the segments of an AnsiParser in 'terminal' mode and tells the caller which lines
// changed; the caller renders them with textContent only.
//
// Bounded: only the last `liveLines` lines can still change (older ones are handed back as
// frozen, to be kept as they are), the cursor never moves further right than `maxCol`, and a
// line longer than `maxLine` characters loses its start.
//
// Line numbers: `firstLine` is the number of the output line the screen starts on; every "\n"
// counts one more, whether it starts a new line on the screen or moves down to an old one.

/**
 * A line: its text, its style runs ({end, cls}, in order, covering the text), and `n`, the
 * number of the output line (counted by "\n", from 1) it was started on. Lines that a cursor
 * move went back over keep their number; the output lines written over them start none.
 */
function newLine(n) {
  return { text: '', runs: [], nl: false, n };
}
// A line written over by a later output line (a redrawn progress bar) takes that line's
// number: the numbers shown are those of the output lines whose text is shown.

function appendRun(line, text, cls) {
  line.text += text;
  const last = line.runs[line.runs.length - 1];
  if (last && last.cls === cls) last.end = line.text.length;
  else line.runs.push({ end: line.text.length, cls });
}

/** The runs with [from, to) given class `cls`, adjacent runs of one class merged. */
function restyle(runs, from, to, cls) {
  const out = [];
  const push = (end, c) => {
    const last = out[out.length - 1];
    if (last && last.cls === c) last.end = end;
    else if (!last || end > last.end) out.push({ end, cls: c });
  };
  let start = 0;
  let placed = false;
  for (const r of runs) {
    if (r.end <= from) push(r.end, r.cls);
    else {
      if (start < from) push(from, r.cls);
      if (!placed) {
        push(to, cls);
        placed = true;
      }
      if (r.end > to) push(r.end, r.cls);
    }
    start = r.end;
  }
  if (!placed) push(to, cls);
  return out;
}

/** Writes `text` at column `col`, overwriting what is there and padding with spaces. */
function writeAt(line, col, text, cls) {
  if (col > line.text.length) appendRun(line, ' '.repeat(col - line.text.length), '');
  if (col === line.text.length) {
    appendRun(line, text, cls);
    return;
  }
  const end = col + text.length;
  line.text = line.text.slice(0, col) + text + line.text.slice(end);
  line.runs = restyle(line.runs, col, Math.min(end, line.text.length), cls);
}

/** Keeps the first `col` characters. */
function truncate(line, col) {
  if (col >= line.text.length) return;
  line.text = line.text.slice(0, col);
  const runs = [];
  for (const r of line.runs) {
    if (r.end >= col) {
      if (col > 0 && (runs.length === 0 || runs[runs.length - 1].end < col)) runs.push({ end: col, cls: r.cls });
      break;
    }
    runs.push(r);
  }
  line.runs = runs;
}

/** Drops the first `n` characters. */
function dropStart(line, n) {
  line.text = line.text.slice(n);
  line.runs = line.runs.filter((r) => r.end > n).map((r) => ({ end: r.end - n, cls: r.cls }));
}

export class Screen {
  constructor({ liveLines = 200, maxCol = 1024, maxLine = 256 * 1024, firstLine = 1 } = {}) {
    this.liveLines = liveLines;
    this.maxCol = maxCol;
    this.maxLine = maxLine;
    this.line = firstLine; // the output line being written
    this.lines = [newLine(firstLine)];
    this.row = 0;
    this.col = 0;
    this.dropped = 0; // characters cut from the start of over-long lines
  }

  /**
   * Applies parser segments.
   * @returns {{changed: object[], frozen: object[]}} lines to (re)render, in order, and lines
   *   that left the live region (the oldest first; they never change again)
   */
  apply(segments) {
    const changed = new Set();
    const frozen = [];
    for (const seg of segments) {
      if (seg.op === undefined) this.text(seg.text, seg.cls, changed, frozen);
      else this.op(seg.op, seg.n, changed);
    }
    return { changed: [...changed], frozen };
  }

  text(t, cls, changed, frozen) {
    let start = 0;
    for (;;) {
      const nl = t.indexOf('\n', start);
      const part = nl < 0 ? t.slice(start) : t.slice(start, nl);
      if (part) {
        const line = this.lines[this.row];
        line.n = this.line; // numbered after the output line that wrote it last
        writeAt(line, this.col, part, cls);
        this.col += part.length;
        if (line.text.length > this.maxLine) {
          const cut = line.text.length - this.maxLine;
          dropStart(line, cut);
          this.dropped += cut;
          this.col = Math.max(0, this.col - cut);
        }
        changed.add(line);
      }
      if (nl < 0) return;
      this.newline(changed, frozen);
      start = nl + 1;
    }
  }

  newline(changed, frozen) {
    this.col = 0;
    this.line++;
    if (this.row < this.lines.length - 1) {
      this.row++;
      return;
    }
    const ended = this.lines[this.row];
    ended.nl = true;
    changed.add(ended);
    const line = newLine(this.line);
    this.lines.push(line);
    this.row++;
    changed.add(line);
    while (this.lines.length > this.liveLines) {
      frozen.push(this.lines.shift());
      this.row--;
    }
  }

  op(name, n, changed) {
    const line = this.lines[this.row];
    switch (name) {
      case 'cr':
        this.col = 0;
        break;
      case 'left':
        this.col = Math.max(0, this.col - n);
        break;
      case 'right':
        this.col = Math.min(this.maxCol, this.col + n);
        break;
      case 'col':
        this.col = Math.min(this.maxCol, n - 1);
        break;
      case 'up':
      case 'prev':
        this.row = Math.max(0, this.row - n);
        if (name === 'prev') this.col = 0;
        break;
      case 'down':
      case 'next':
        this.row = Math.min(this.lines.length - 1, this.row + n);
        if (name === 'next') this.col = 0;
        break;
      case 'el':
        line.n = this.line;
        if (n === 0) truncate(line, this.col);
        else if (n === 1) writeAt(line, 0, ' '.repeat(Math.min(this.col + 1, line.text.length)), '');
        else {
          line.text = '';
          line.runs = [];
        }
        changed.add(line);
        break;
      default:
        break;
    }
  }

  /** Every live line leaves the live region (a marker is shown after them). */
  freezeAll() {
    const frozen = this.lines;
    this.lines = [newLine(this.line)];
    this.row = 0;
    this.col = 0;
    return frozen;
  }

  /** The oldest live line leaves the live region, if another one is left; or null. */
  freezeOldest() {
    if (this.lines.length < 2) return null;
    this.row = Math.max(0, this.row - 1);
    return this.lines.shift();
  }
}

/** The text of a line with each run's class: what the caller renders. */
export function runsOf(line) {
  const out = [];
  let start = 0;
  for (const r of line.runs) {
    if (r.end > start) out.push({ text: line.text.slice(start, r.end), cls: r.cls });
    start = r.end;
  }
  return out;
}
