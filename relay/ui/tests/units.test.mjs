// Unit tests of the UI's pure modules (no browser): the Markdown parser, link checks, the ANSI
// parser, and a check that no UI source uses an HTML-parsing sink.

import test from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse, inline, safeHref } from '../markdown.js';
import { AnsiParser, plainText } from '../ansi.js';
import { Screen, runsOf } from '../terminal.js';

const UI = join(dirname(fileURLToPath(import.meta.url)), '..');

/** The tree as compact text, e.g. "h1(Title) p(a em(b))". */
function show(node) {
  if (node.t === 'text') return node.v;
  const inner = (node.c || []).map(show).join(' ');
  if (node.t === 'root') return inner;
  const attrs = node.href ? `[${node.href}]` : '';
  return `${node.t}${attrs}(${inner})`;
}

test('markdown blocks', () => {
  assert.equal(show(parse('# Title\n\nSome *text* and **bold**.')), 'h1(Title) p(Some  em(text)  and  strong(bold) .)');
  assert.equal(show(parse('```js\nlet a = "<b>";\n```')), 'pre(code(let a = "<b>";))');
  assert.equal(show(parse('- a\n- b\n  - c\n- d')), 'ul(li(a) li(b ul(li(c))) li(d))');
  assert.equal(show(parse('1. one\n2. two')), 'ol(li(one) li(two))');
  assert.equal(show(parse('> quoted\n> more')), 'blockquote(p(quoted\nmore))');
  assert.equal(show(parse('a\n\n---\n\nb')), 'p(a) hr() p(b)');
  assert.equal(show(parse('| a | b |\n|---|--:|\n| 1 | 2 |')), 'table(thead(tr(th(a) th(b))) tbody(tr(td(1) td(2))))');
  // An unclosed fence runs to the end instead of swallowing nothing.
  assert.equal(show(parse('```\ncode')), 'pre(code(code))');
});

test('markdown inlines and links', () => {
  assert.equal(show({ t: 'root', c: inline('`<script>`') }), 'code(<script>)');
  assert.equal(show({ t: 'root', c: inline('[site](https://example.com/x)') }), 'a[https://example.com/x](site)');
  // Unsafe targets keep their text but lose the link.
  assert.equal(show({ t: 'root', c: inline('[click](javascript:alert(1))') }), 'click');
  assert.equal(show({ t: 'root', c: inline('[x](JaVaScRiPt:alert(1))') }), 'x');
  assert.equal(show({ t: 'root', c: inline('[x](data:text/html,hi)') }), 'x');
  assert.equal(show({ t: 'root', c: inline('[x](/api/runs)') }), 'x');
  assert.equal(show({ t: 'root', c: inline('see https://example.com/a.') }), 'see  a[https://example.com/a](https://example.com/a) .');
  assert.equal(show({ t: 'root', c: inline('<https://example.com>') }), 'a[https://example.com/](https://example.com)');
  assert.equal(show({ t: 'root', c: inline('![logo](https://example.com/l.png)') }), 'a[https://example.com/l.png](image: logo)');
  // Raw HTML is text.
  assert.equal(show({ t: 'root', c: inline('<img src=x onerror=alert(1)>') }), '<img src=x onerror=alert(1)>');
  assert.equal(show({ t: 'root', c: inline('snake_case_name') }), 'snake_case_name');
  assert.equal(show({ t: 'root', c: inline('~~old~~ \\*lit\\*') }), 'del(old)  *lit*');
});

test('safeHref allows only absolute http and https URLs', () => {
  assert.equal(safeHref('https://example.com'), 'https://example.com/');
  assert.equal(safeHref('HTTP://EXAMPLE.com/a'), 'http://example.com/a');
  for (const bad of ['javascript:alert(1)', ' javascript:alert(1)', 'java\tscript:alert(1)', 'vbscript:x', 'data:text/html,x', '//evil.example', '/relative', 'mailto:a@b', 'http:/x', 'https://', '']) {
    assert.equal(safeHref(bad), null, bad);
  }
});

test('markdown parser stays fast on hostile input', () => {
  const inputs = ['*a'.repeat(50000), '['.repeat(100000), '>'.repeat(50000) + ' x', '- '.repeat(20000) + 'x', '`'.repeat(100000), '_a_'.repeat(30000), '| a '.repeat(20000) + '\n|---|\n'];
  for (const s of inputs) {
    const t0 = Date.now();
    parse(s);
    assert.ok(Date.now() - t0 < 2000, `parsing ${JSON.stringify(s.slice(0, 10))}… took ${Date.now() - t0} ms`);
  }
});

test('ANSI colours become classes and other sequences disappear', () => {
  const p = new AnsiParser();
  const segs = p.push('plain \x1b[1;31mred bold\x1b[0m back \x1b]0;title\x07\x1b[2Kdone\x1b]8;;https://e.x\x1b\\link\x1b]8;;\x1b\\');
  assert.deepEqual(segs, [
    { text: 'plain ', cls: '' },
    { text: 'red bold', cls: 'a-fg1 a-b' },
    { text: ' back donelink', cls: '' },
  ]);
});

test('escape sequences split across chunks are joined', () => {
  const p = new AnsiParser();
  const a = p.push('x\x1b[3');
  const b = p.push('2mgreen\x1b[0m\r');
  const c = p.push('\nnext');
  assert.equal(plainText([...a, ...b, ...c]), 'xgreen\nnext');
  assert.equal(b[0].cls, 'a-fg2');
});

test('control characters are shown as symbols, never interpreted', () => {
  const p = new AnsiParser();
  const segs = p.push('a\x00b\x07c\x08d\x7fe\u202eevil\u2066f\x9bg\tt\n', true);
  assert.equal(segs.map((s) => s.text).join(''), 'a\u2400b\u2407c\u2408d\u2421e<U+202E>evil<U+2066>f\\x9bg\tt\n');
  assert.ok(segs.filter((s) => s.cls === 'ctl').length >= 5);
  // A lone ESC at the very end is shown when nothing follows.
  assert.equal(plainText(new AnsiParser().push('x\x1b', true)), 'x');
  assert.equal(new AnsiParser().push('x\x1b', true).map((s) => s.text).join(''), 'x\u241b');
});

/** What a terminal would show after `chunks`: the lines, each "text" or "text|cls..." runs. */
function screenOf(chunks, options) {
  const parser = new AnsiParser({ mode: 'terminal' });
  const screen = new Screen(options);
  const frozen = [];
  chunks.forEach((c, i) => frozen.push(...screen.apply(parser.push(c, i === chunks.length - 1)).frozen));
  return [...frozen, ...screen.lines].map((l) => l.text);
}

test('terminal: a carriage return overwrites the line, as progress bars expect', () => {
  assert.deepEqual(screenOf(['progress: 10%\rprogress: 50%\rprogress: 100%\n']), ['progress: 100%', '']);
  // Split anywhere, even between "\r" and what follows.
  assert.deepEqual(screenOf(['downloading 1', '0%\r', 'downloading 20%\r', 'done           \n']), ['done           ', '']);
  // "\r\n" is a line end, not an overwrite.
  assert.deepEqual(screenOf(['a\r\nb\r', '\nc']), ['a', 'b', 'c']);
  // A shorter text overwrites only its own width.
  assert.deepEqual(screenOf(['abcdef\rXY']), ['XYcdef']);
});

test('terminal: erase-in-line, backspace and columns', () => {
  assert.deepEqual(screenOf(['spinner |\r\x1b[Kspinner /\r\x1b[2Kdone']), ['done']);
  assert.deepEqual(screenOf(['abcdef\x1b[3D\x1b[0K!']), ['abc!']);
  assert.deepEqual(screenOf(['abcdef\x1b[3D\x1b[1K']), ['    ef']);
  assert.deepEqual(screenOf(['ab\b\bxy\by']), ['xy']);
  assert.deepEqual(screenOf(['ab\x1b[6Gz']), ['ab   z']);
  // A cursor move far to the right is bounded.
  assert.equal(screenOf(['\x1b[99999999Cx'], { maxCol: 80 })[0].length, 81);
});

test('terminal: cursor up redraws a two-line progress bar in place', () => {
  const frames = [];
  for (let i = 1; i <= 3; i++) frames.push(`${i === 1 ? '' : '\x1b[2A'}\r\x1b[Kfile ${i}/3\n\r\x1b[Kbar ${'#'.repeat(i)}\n`);
  assert.deepEqual(screenOf(['start\n', ...frames, 'end\n']), ['start', 'file 3/3', 'bar ###', 'end', '']);
  // Up never goes above the first live line, down never below the last.
  assert.deepEqual(screenOf(['a\nb\x1b[9Ax\x1b[9By']), ['ax', 'b y']);
});

test('terminal: colours survive overwrites', () => {
  const parser = new AnsiParser({ mode: 'terminal' });
  const screen = new Screen();
  screen.apply(parser.push('\x1b[32mgreen text\x1b[0m\r\x1b[31mRED', true));
  assert.deepEqual(runsOf(screen.lines[0]), [
    { text: 'RED', cls: 'a-fg1' },
    { text: 'en text', cls: 'a-fg2' },
  ]);
});

test('terminal: lines leave the live region and long lines lose their start', () => {
  const parser = new AnsiParser({ mode: 'terminal' });
  const screen = new Screen({ liveLines: 3, maxLine: 10 });
  const { frozen } = screen.apply(parser.push('1\n2\n3\n4\n5', true));
  assert.deepEqual(frozen.map((l) => l.text), ['1', '2']);
  assert.deepEqual(screen.lines.map((l) => [l.text, l.nl]), [['3', true], ['4', true], ['5', false]]);
  // Up stops at the oldest live line: frozen lines never change.
  screen.apply(parser.push('\x1b[9A\rX', true));
  assert.deepEqual(screen.lines.map((l) => l.text), ['X', '4', '5']);
  screen.apply(parser.push('\x1b[2B0123456789abc', true));
  assert.equal(screen.lines[2].text, '3456789abc');
});

test('raw mode shows every byte and interprets nothing', () => {
  const segs = new AnsiParser({ mode: 'raw' }).push('a\rb\x1b[2K\x1b[31mc\x08\r\n', true);
  assert.equal(segs.map((s) => s.text).join(''), 'a\u240db\u241b[2K\u241b[31mc\u2408\u240d\n');
  assert.ok(segs.every((s) => s.op === undefined && (s.cls === '' || s.cls === 'ctl')));
});

test('UI sources never parse strings as HTML or code', () => {
  const sinks = /\b(innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\s*\(|new Function|setAttribute\(\s*['"](on|style|href|src))|createContextualFragment|DOMParser/;
  const files = readdirSync(UI).filter((f) => f.endsWith('.js'));
  assert.ok(files.includes('app.js') && files.includes('markdown.js'));
  for (const f of files) {
    const src = readFileSync(join(UI, f), 'utf8');
    const code = src.replace(/^\s*\/\/.*$/gm, '');
    const m = sinks.exec(code);
    assert.equal(m, null, `${f} uses ${m && m[0]}`);
  }
  const html = readFileSync(join(UI, 'index.html'), 'utf8');
  assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>/, 'index.html has an inline script');
  assert.doesNotMatch(html, /\sstyle=|<style/, 'index.html has inline style');
  assert.doesNotMatch(html, /\son[a-z]+=/, 'index.html has an inline event handler');
});

test('line links: #VARIATION:L12 and #VARIATION:L12-L20, anything else is no link', async () => {
  const { parseLineHash, lineHash } = await import('../lines.js');
  assert.deepEqual(parseLineHash('#default:L1234-L1240'), { variation: 'default', from: 1234, to: 1240 });
  assert.deepEqual(parseLineHash('#a-b:L7'), { variation: 'a-b', from: 7, to: 7 });
  assert.deepEqual(parseLineHash('#x:L20-L10'), { variation: 'x', from: 10, to: 20 });
  for (const bad of ['', '#', '#default', '#default:L0', '#default:12', '#-a:L1', '#a:L1-', '#a:Lx', '#<b>:L1']) assert.equal(parseLineHash(bad), null, bad);
  assert.equal(lineHash('v', 3), '#v:L3');
  assert.equal(lineHash('v', 3, 9), '#v:L3-L9');
  assert.deepEqual(parseLineHash(lineHash('v', 3, 9)), { variation: 'v', from: 3, to: 9 });
});

test('lines of a block are picked out of range pages, whatever the entry boundaries', async () => {
  const { LineCollector } = await import('../lines.js');
  const b64 = (s) => Buffer.from(s).toString('base64');
  // Lines 1..7; entries split them anywhere, one is base64, one a gap.
  const pages = [
    { entries: [{ line: 1, type: 'output', content: 'l1-tail\nl2\nl' }, { line: 3, type: 'output', content: b64('3 \u00e9'), encoding: 'base64' }], moreAfter: true },
    { entries: [{ line: 3, type: 'output', content: '\nl4\n' }, { line: 5, type: 'gap', meta: { droppedBytes: 10 } }, { line: 5, type: 'output', content: 'l5\nl6\nl7\n' }], moreAfter: false },
  ];
  const c = new LineCollector(3, 5);
  for (const p of pages) c.add(p);
  assert.equal(c.done, true);
  assert.deepEqual(c.items, ['l3 \u00e9\nl4\n', { marker: '⚠ gap: 10 B of output could not be kept and were dropped here', kind: 'warn' }, 'l5\n']);
});

test('rows are numbered by output line; a redrawn bar takes the number of the line that wrote it last', async () => {
  const { renderItems } = await import('../lines.js');
  const raw = 'a\nfile 1/2\nbar #\n\x1b[2A\r\x1b[Kfile 2/2\n\r\x1b[Kbar ##\ndone\n';
  const { rows } = renderItems([raw], { mode: 'terminal', firstLine: 10, maxLine: 1000 });
  assert.deepEqual(rows.map((r) => [r.n, r.text]), [[10, 'a'], [13, 'file 2/2'], [14, 'bar ##'], [15, 'done'], [16, '']]);
  const rawRows = renderItems([raw], { mode: 'raw', firstLine: 10, maxLine: 1000 }).rows;
  assert.deepEqual(rawRows.map((r) => r.n), [10, 11, 12, 13, 14, 15, 16]);
  assert.equal(rawRows[3].text, '\u241b[2A\u240d\u241b[Kfile 2/2');
});
