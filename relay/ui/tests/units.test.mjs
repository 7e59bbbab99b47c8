// Unit tests of the UI's pure modules (no browser): the Markdown parser, link checks, the ANSI
// parser, and a check that no UI source uses an HTML-parsing sink.

import test from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse, inline, safeHref } from '../markdown.js';
import { AnsiParser, plainText } from '../ansi.js';

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
