// A small, safe Markdown renderer for agent output.
//
// parse(text) turns Markdown into a plain tree of {t: tag, c: children} / {t: 'text', v} nodes;
// render(tree, document) builds DOM nodes from it with createElement and textContent only, from
// a fixed list of tags, and the only attribute it ever sets from the input is the href of a
// link, and only to an absolute http: or https: URL. Raw HTML in the input is shown as text.
// Supported: ATX headings, paragraphs, emphasis, strong, strikethrough, code spans, fenced code
// blocks, block quotes, ordered and unordered (nested) lists, thematic breaks, pipe tables,
// links, autolinks and bare http(s) URLs. Images are shown as links to their source.

const MAX_DEPTH = 16; // nesting of block quotes and lists
const MAX_INLINE = 20000; // a longer paragraph is shown as plain text
const MAX_SCAN = 1000; // how far ahead a closing delimiter is looked for

/** The href to use for a link target, or null when it is not an absolute http(s) URL. */
export function safeHref(url) {
  if (typeof url !== 'string') return null;
  const u = url.trim();
  if (!/^https?:\/\//i.test(u)) return null;
  try {
    const parsed = new URL(u);
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') return null;
    return parsed.href;
  } catch {
    return null;
  }
}

const text = (v) => ({ t: 'text', v });

// ---------------------------------------------------------------------------------------------
// Blocks

const RE_FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const RE_HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RE_HR = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const RE_QUOTE = /^ {0,3}> ?(.*)$/;
const RE_BULLET = /^( {0,3})([-*+])([ \t]+|$)(.*)$/;
const RE_ORDERED = /^( {0,3})(\d{1,9})([.)])([ \t]+|$)(.*)$/;
const RE_TABLE_DELIM = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;

/** Parses Markdown text into a tree. */
export function parse(src) {
  const lines = String(src).replace(/\r\n?/g, '\n').split('\n');
  return { t: 'root', c: parseBlocks(lines, 0) };
}

function isBlank(l) {
  return /^[ \t]*$/.test(l);
}

function startsBlock(l) {
  return RE_FENCE.test(l) || RE_HEADING.test(l) || RE_HR.test(l) || RE_QUOTE.test(l) || RE_BULLET.test(l) || RE_ORDERED.test(l);
}

function splitRow(l) {
  let s = l.trim();
  if (s.startsWith('|')) s = s.slice(1);
  if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
  const cells = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '\\' && s[i + 1] === '|') {
      cur += '|';
      i++;
    } else if (s[i] === '|') {
      cells.push(cur.trim());
      cur = '';
    } else cur += s[i];
  }
  cells.push(cur.trim());
  return cells;
}

function parseBlocks(lines, depth) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i++;
      continue;
    }
    let m;
    if ((m = RE_FENCE.exec(line))) {
      const fence = m[1];
      const body = [];
      i++;
      while (i < lines.length) {
        const close = lines[i].trim();
        if (close.startsWith(fence[0].repeat(fence.length)) && /^([`~])\1*$/.test(close)) {
          i++;
          break;
        }
        body.push(lines[i]);
        i++;
      }
      const code = { t: 'code', c: [text(body.join('\n'))] };
      if (m[2]) code.lang = m[2].slice(0, 40);
      out.push({ t: 'pre', c: [code] });
      continue;
    }
    if ((m = RE_HEADING.exec(line))) {
      out.push({ t: `h${m[1].length}`, c: inline(m[2] || '') });
      i++;
      continue;
    }
    if (RE_HR.test(line)) {
      out.push({ t: 'hr', c: [] });
      i++;
      continue;
    }
    if (RE_QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && !isBlank(lines[i])) {
        const q = RE_QUOTE.exec(lines[i]);
        body.push(q ? q[1] : lines[i]);
        i++;
      }
      out.push({ t: 'blockquote', c: depth < MAX_DEPTH ? parseBlocks(body, depth + 1) : [{ t: 'p', c: [text(body.join('\n'))] }] });
      continue;
    }
    if (RE_BULLET.test(line) || RE_ORDERED.test(line)) {
      const [list, next] = parseList(lines, i, depth);
      out.push(list);
      i = next;
      continue;
    }
    if (line.includes('|') && i + 1 < lines.length && RE_TABLE_DELIM.test(lines[i + 1]) && lines[i + 1].includes('-')) {
      const head = splitRow(line);
      const aligns = splitRow(lines[i + 1]).map((d) => (d.startsWith(':') && d.endsWith(':') ? 'center' : d.endsWith(':') ? 'right' : ''));
      if (aligns.length === head.length) {
        i += 2;
        const rows = [];
        while (i < lines.length && !isBlank(lines[i]) && lines[i].includes('|') && !startsBlock(lines[i])) {
          rows.push(splitRow(lines[i]));
          i++;
        }
        const cell = (tag, v, k) => {
          const n = { t: tag, c: inline(v || '') };
          if (aligns[k]) n.align = aligns[k];
          return n;
        };
        out.push({
          t: 'table',
          c: [
            { t: 'thead', c: [{ t: 'tr', c: head.map((v, k) => cell('th', v, k)) }] },
            { t: 'tbody', c: rows.map((r) => ({ t: 'tr', c: head.map((_, k) => cell('td', r[k], k)) })) },
          ],
        });
        continue;
      }
    }
    // Paragraph: up to a blank line or the start of another block.
    const para = [line.trim()];
    i++;
    while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i])) {
      para.push(lines[i].trim());
      i++;
    }
    out.push({ t: 'p', c: inline(para.join('\n')) });
  }
  return out;
}

function parseList(lines, start, depth) {
  const first = RE_BULLET.exec(lines[start]);
  const ordered = !first;
  const m0 = first || RE_ORDERED.exec(lines[start]);
  const marker = ordered ? m0[3] : m0[2];
  const list = { t: ordered ? 'ol' : 'ul', c: [] };
  if (ordered) {
    const n = Number.parseInt(m0[2], 10);
    if (n !== 1) list.start = n;
  }
  let i = start;
  while (i < lines.length) {
    const m = ordered ? RE_ORDERED.exec(lines[i]) : RE_BULLET.exec(lines[i]);
    if (!m || (ordered ? m[3] : m[2]) !== marker) break;
    const indent = m[1].length + (ordered ? m[2].length + 1 : 1) + Math.max(1, (ordered ? m[4] : m[3]).length);
    const body = [ordered ? m[5] : m[4]];
    i++;
    let sawBlank = false;
    while (i < lines.length) {
      const l = lines[i];
      if (isBlank(l)) {
        sawBlank = true;
        body.push('');
        i++;
        continue;
      }
      const lead = l.length - l.trimStart().length;
      if (lead >= indent) {
        body.push(l.slice(indent));
      } else if (lead >= 2 && (RE_BULLET.test(l.trimStart()) || RE_ORDERED.test(l.trimStart()))) {
        body.push(l.slice(lead)); // a sub-list indented less than the content: still nested
      } else if (!sawBlank && !startsBlock(l)) {
        body.push(l.trim()); // lazy continuation of the item's paragraph
      } else break;
      sawBlank = false;
      i++;
    }
    while (body.length && isBlank(body[body.length - 1])) body.pop();
    let children = depth < MAX_DEPTH ? parseBlocks(body, depth + 1) : [{ t: 'p', c: [text(body.join('\n'))] }];
    // Tight items: a lone paragraph is shown without <p>.
    if (children.length >= 1 && children[0].t === 'p' && !body.includes('')) {
      children = [...children[0].c, ...children.slice(1)];
    }
    list.c.push({ t: 'li', c: children });
    // Blank lines between items are allowed.
    let j = i;
    while (j < lines.length && isBlank(lines[j])) j++;
    if (j < lines.length && j > i) {
      const next = ordered ? RE_ORDERED.exec(lines[j]) : RE_BULLET.exec(lines[j]);
      if (next && (ordered ? next[3] : next[2]) === marker) i = j;
      else break;
    }
  }
  return [list, i];
}

// ---------------------------------------------------------------------------------------------
// Inlines

const PUNCT_ESCAPABLE = '\\`*_{}[]()#+-.!|~<>"\'';
const RE_BARE_URL = /^https?:\/\/[^\s<>"'`]+/i;

/** Parses inline Markdown into nodes. */
export function inline(src) {
  if (src.length > MAX_INLINE) return [text(src)];
  return inlineRange(src, 0);
}

function inlineRange(s, depth) {
  const out = [];
  let buf = '';
  const flush = () => {
    if (buf) out.push(text(buf));
    buf = '';
  };
  let i = 0;
  while (i < s.length) {
    const ch = s[i];
    if (ch === '\\' && i + 1 < s.length && PUNCT_ESCAPABLE.includes(s[i + 1])) {
      buf += s[i + 1];
      i += 2;
      continue;
    }
    if (ch === '\\' && s[i + 1] === '\n') {
      flush();
      out.push({ t: 'br', c: [] });
      i += 2;
      continue;
    }
    if (ch === '\n') {
      if (buf.endsWith('  ')) {
        buf = buf.replace(/ +$/, '');
        flush();
        out.push({ t: 'br', c: [] });
      } else buf += '\n';
      i++;
      continue;
    }
    if (ch === '`') {
      let n = 1;
      while (s[i + n] === '`') n++;
      const ticks = '`'.repeat(n);
      const close = s.indexOf(ticks, i + n);
      if (close > 0 && close - i < MAX_SCAN * 10 && s[close + n] !== '`') {
        flush();
        let code = s.slice(i + n, close).replace(/\n/g, ' ');
        if (code.length > 2 && code.startsWith(' ') && code.endsWith(' ') && code.trim()) code = code.slice(1, -1);
        out.push({ t: 'code', c: [text(code)] });
        i = close + n;
      } else {
        buf += ticks;
        i += n;
      }
      continue;
    }
    if (ch === '<') {
      const m = /^<(https?:\/\/[^\s<>]+)>/i.exec(s.slice(i, i + MAX_SCAN));
      const href = m && safeHref(m[1]);
      if (href) {
        flush();
        out.push({ t: 'a', href, c: [text(m[1])] });
        i += m[0].length;
        continue;
      }
      buf += ch;
      i++;
      continue;
    }
    if ((ch === 'h' || ch === 'H') && (i === 0 || /[\s(*_~]/.test(s[i - 1]))) {
      const m = RE_BARE_URL.exec(s.slice(i, i + MAX_SCAN));
      if (m) {
        let url = m[0].replace(/[.,:;!?]+$/, '');
        if (url.endsWith(')') && !url.includes('(')) url = url.slice(0, -1);
        const href = safeHref(url);
        if (href) {
          flush();
          out.push({ t: 'a', href, c: [text(url)] });
          i += url.length;
          continue;
        }
      }
    }
    if (ch === '[' || (ch === '!' && s[i + 1] === '[')) {
      const image = ch === '!';
      const link = depth < 4 ? parseLink(s, image ? i + 1 : i) : null;
      if (link) {
        flush();
        const href = safeHref(link.url);
        const label = image ? [text(link.label ? `image: ${link.label}` : 'image')] : inlineRange(link.label, depth + 1);
        if (href) out.push({ t: 'a', href, c: label });
        else out.push(...label); // unsafe or relative target: show only the text
        i = link.end;
        continue;
      }
    }
    if (ch === '*' || ch === '_' || ch === '~') {
      let n = 1;
      while (s[i + n] === ch) n++;
      const prev = i > 0 ? s[i - 1] : ' ';
      const next = s[i + n] || ' ';
      const intraword = ch === '_' && /[\p{L}\p{N}]/u.test(prev);
      const use = ch === '~' ? (n === 2 ? 2 : 0) : Math.min(n, 3);
      if (use && !/\s/.test(next) && !intraword && depth < 8) {
        const delim = ch.repeat(use);
        const close = findClose(s, i + use, delim, ch);
        if (close > 0) {
          flush();
          const inner = inlineRange(s.slice(i + use, close), depth + 1);
          let node;
          if (ch === '~') node = { t: 'del', c: inner };
          else if (use === 1) node = { t: 'em', c: inner };
          else if (use === 2) node = { t: 'strong', c: inner };
          else node = { t: 'em', c: [{ t: 'strong', c: inner }] };
          out.push(node);
          i = close + use;
          continue;
        }
      }
      buf += ch.repeat(n);
      i += n;
      continue;
    }
    buf += ch;
    i++;
  }
  flush();
  return out;
}

function findClose(s, from, delim, ch) {
  const limit = Math.min(s.length, from + MAX_SCAN);
  let j = from;
  while (j < limit) {
    const k = s.indexOf(delim, j);
    if (k < 0 || k >= limit) return -1;
    const before = s[k - 1];
    const after = s[k + delim.length];
    const intraword = ch === '_' && after !== undefined && /[\p{L}\p{N}]/u.test(after);
    if (k > from && !/\s/.test(before) && after !== ch && !intraword) return k;
    j = k + 1;
  }
  return -1;
}

function parseLink(s, i) {
  // [label](url "title")
  let depth = 0;
  let j = i;
  const limit = Math.min(s.length, i + MAX_SCAN);
  for (; j < limit; j++) {
    if (s[j] === '\\') {
      j++;
      continue;
    }
    if (s[j] === '[') depth++;
    else if (s[j] === ']') {
      depth--;
      if (depth === 0) break;
    }
  }
  if (j >= limit || s[j + 1] !== '(') return null;
  const label = s.slice(i + 1, j);
  const rest = s.slice(j + 2, j + 2 + MAX_SCAN);
  const m = /^[ \t]*(?:<([^<>\n]*)>|([^\s()]*(?:\([^\s()]*\)[^\s()]*)*))(?:[ \t]+("[^"]*"|'[^']*'))?[ \t]*\)/.exec(rest);
  if (!m) return null;
  return { label, url: m[1] !== undefined ? m[1] : m[2], end: j + 2 + m[0].length };
}

// ---------------------------------------------------------------------------------------------
// DOM

const TAGS = new Set([
  'p', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'ul', 'ol', 'li', 'pre', 'code', 'blockquote', 'hr',
  'em', 'strong', 'del', 'a', 'br', 'table', 'thead', 'tbody', 'tr', 'th', 'td',
]);

/** Builds DOM nodes for a tree made by parse() (or inline()). */
export function render(node, doc = document) {
  const frag = doc.createDocumentFragment();
  const kids = node.t === 'root' ? node.c : [node];
  for (const k of kids) frag.appendChild(build(k, doc));
  return frag;
}

function build(n, doc) {
  if (n.t === 'text') return doc.createTextNode(n.v);
  if (!TAGS.has(n.t)) return doc.createTextNode('');
  const el = doc.createElement(n.t);
  if (n.t === 'a') {
    const href = safeHref(n.href);
    if (!href) return buildChildren(doc.createElement('span'), n, doc);
    el.href = href;
    el.rel = 'noopener noreferrer nofollow';
    el.target = '_blank';
    el.title = href;
  }
  if (n.t === 'ol' && Number.isSafeInteger(n.start)) el.start = n.start;
  if ((n.t === 'th' || n.t === 'td') && (n.align === 'center' || n.align === 'right')) el.className = `al-${n.align}`;
  if (n.t === 'code' && typeof n.lang === 'string') el.dataset.lang = n.lang;
  return buildChildren(el, n, doc);
}

function buildChildren(el, n, doc) {
  for (const k of n.c || []) el.appendChild(build(k, doc));
  return el;
}
