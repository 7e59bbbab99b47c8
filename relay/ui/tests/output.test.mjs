// A 300,000-line run, written by a real agent through `agentrun-sidecar run`, in the output
// pane: it loads and follows to the last line, scrolling to the top shows the first line (read
// again from the relay's range endpoint), the DOM and the JS heap stay bounded, a search for a
// line in the middle goes to it, a line link opens at that line, and the download is the
// agent's bytes.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { startStack, waitFor, uniqueRun, binary, spawnTied } from './lib/harness.mjs';

let s;
before(async () => {
  s = await startStack();
});
after(async () => {
  await s?.close();
});

const LINES = 300_000;
const X = 'x'.repeat(100);
/** Line i (from 1) as the agent writes it. */
const lineOf = (i) => `line ${String(i).padStart(6, '0')} ${X.slice(0, i % 100)} end`;
const AGENT = `awk 'BEGIN { x = "${X}"; for (i = 1; i <= ${LINES}; i++) printf "line %06d %s end\\n", i, substr(x, 1, i % 100) }'`;

/** The text of a row of the pane, once it is in the DOM and loaded. */
function rowText(page, v, n) {
  return page.evaluate(([v, n]) => {
    const row = document.querySelector(`section.variation[data-variation="${v}"] pre.term .row[data-line="${n}"]:not(.pending)`);
    return row ? row.textContent : null;
  }, [v, n]);
}

/** Whether row n is in the DOM, highlighted, and inside the visible part of the scroll area. */
function rowInView(page, v, n) {
  return page.evaluate(([v, n]) => {
    const scroller = document.querySelector(`section.variation[data-variation="${v}"] .output-scroll`);
    const row = scroller.querySelector(`.row[data-line="${n}"]:not(.pending)`);
    if (!row) return false;
    const a = scroller.getBoundingClientRect();
    const b = row.getBoundingClientRect();
    return b.top >= a.top && b.bottom <= a.bottom && row.classList.contains('hl');
  }, [v, n]);
}

/** DOM nodes in the whole page and in the output pane, and the JS heap after a GC (bytes). */
async function footprint(page) {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('HeapProfiler.collectGarbage');
  const { usedSize } = await cdp.send('Runtime.getHeapUsage');
  await cdp.detach();
  const nodes = await page.evaluate(() => ({
    page: document.getElementsByTagName('*').length,
    pane: document.querySelector('section.variation pre.term').getElementsByTagName('*').length,
  }));
  return { heap: usedSize, ...nodes };
}

test('a 300,000-line run: scroll back to the first line, search, line links, download; memory bounded', async () => {
  let last = Date.now();
  const step = (what) => {
    console.log(`# ${what}: ${Date.now() - last} ms`);
    last = Date.now();
  };
  const run = uniqueRun('big');
  const t0 = Date.now();
  const agent = spawnTied(binary('agentrun-sidecar'), ['run', '--redis-url', s.redis.url, '--run-id', run, '--variation', 'big', '--quiet', '--', 'sh', '-c', AGENT], { stdio: 'ignore' });
  const code = await new Promise((resolve) => agent.on('exit', resolve));
  assert.equal(code, 0, 'the agent ran');
  const bytes = Array.from({ length: LINES }, (_, i) => `${lineOf(i + 1)}\n`).join('');
  const want = { length: Buffer.byteLength(bytes), sha256: createHash('sha256').update(bytes).digest('hex') };
  console.log(`# agent: ${LINES} lines, ${(want.length / 1048576).toFixed(1)} MiB in ${Date.now() - t0} ms`);

  const { page } = s;
  const t1 = Date.now();
  await page.goto(`${s.relay.url}/runs/${run}`);
  const v = 'big';
  await waitFor('every line', async () => (await page.evaluate(() => window.__agentrun.lines?.('big'))) === LINES + 1, 40000);
  await waitFor('the end of the run', async () => (await page.locator('#conn').getAttribute('data-state')) === 'ended');
  console.log(`# page: every line received in ${Date.now() - t1} ms`);
  // It followed to the end.
  await waitFor('the last line in view', async () => (await rowText(page, v, LINES)) === `${lineOf(LINES)}\n`);
  const atEnd = await footprint(page);
  console.log(`# at the end: ${JSON.stringify(atEnd)}`);

  step('load');
  // Scrolled to the top: the first line, read again from the relay.
  const scroller = page.locator(`section.variation[data-variation="${v}"] .output-scroll`);
  await scroller.evaluate((el) => {
    el.scrollTop = 0;
  });
  await waitFor('the first line', async () => (await rowText(page, v, 1)) === `${lineOf(1)}\n`);
  assert.equal(await rowText(page, v, 2), `${lineOf(2)}\n`);

  step('top');
  // Search for a line in the middle: the pane goes to it.
  const middle = LINES / 2;
  await page.locator(`section.variation[data-variation="${v}"] .out-search-input`).fill(lineOf(middle));
  await page.locator(`section.variation[data-variation="${v}"] .out-search-input`).press('Enter');
  await waitFor('the match in view', () => rowInView(page, v, middle), 20000);
  assert.equal(await rowText(page, v, middle), `${lineOf(middle)}\n`);
  assert.equal(await page.locator(`section.variation[data-variation="${v}"] .out-search-status`).textContent(), '1 of 1');

  step('search');
  // Scrolling around loads what it needs and keeps memory bounded.
  for (const at of [0.1, 0.9, 0.3, 0.7, 0.5]) {
    await scroller.evaluate((el, f) => {
      el.scrollTop = el.scrollHeight * f;
    }, at);
    await waitFor(`lines at ${at * 100}% of the output`, async () => page.evaluate((v) => {
      const rows = document.querySelectorAll(`section.variation[data-variation="${v}"] pre.term .row`);
      return rows.length > 0 && ![...rows].some((r) => r.classList.contains('pending'));
    }, v), 20000);
  }
  const after = await footprint(page);
  console.log(`# after scrolling: ${JSON.stringify(after)}`);
  for (const f of [atEnd, after]) {
    assert.ok(f.pane <= 1000, `the output pane has ${f.pane} DOM nodes`);
    assert.ok(f.page <= 2000, `the page has ${f.page} DOM nodes`);
    assert.ok(f.heap <= 32 * 1024 * 1024, `the JS heap holds ${(f.heap / 1048576).toFixed(1)} MiB`);
  }

  step('scrolling');
  // A link to lines opens there, highlighted.
  const from = 123_456;
  await page.goto('about:blank'); // a new page load, not a change of the fragment
  await page.goto(`${s.relay.url}/runs/${run}#${v}:L${from}-L${from + 4}`);
  await waitFor('the linked line in view', () => rowInView(page, v, from), 30000);
  for (let n = from; n <= from + 4; n++) assert.equal(await rowText(page, v, n), `${lineOf(n)}\n`);
  assert.equal(await page.locator(`section.variation[data-variation="${v}"] .row.hl`).count(), 5);
  // Clicking a line number links to it.
  await page.locator(`section.variation[data-variation="${v}"] .row[data-line="${from + 2}"] .ln`).click();
  assert.equal(await page.evaluate(() => location.hash), `#${v}:L${from + 2}`);

  step('link');
  // The download is the agent's bytes.
  const got = await page.locator(`section.variation[data-variation="${v}"] a.download`).evaluate(async (a) => {
    const buf = await (await fetch(a.href)).arrayBuffer();
    const digest = await crypto.subtle.digest('SHA-256', buf);
    return { length: buf.byteLength, sha256: Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('') };
  });
  assert.deepEqual(got, want);
  step('download');
  await s.browser.screenshot('big-output');
  assert.deepEqual(s.browser.errors, []);
});
