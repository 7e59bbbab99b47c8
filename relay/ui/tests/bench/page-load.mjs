// Page-load figures of the run page for a big run (docs/benchmarks.md): a real agent writes
// MB megabytes of numbered lines through `agentrun-sidecar run`, then headless chromium opens
// the run page and this measures how long until every line is counted, the first line after
// scrolling to the top, a search for the middle line, a link to a line on a fresh load, and the
// page's DOM nodes and JS heap. Not a test: it prints figures.
//
//   node relay/ui/tests/bench/page-load.mjs [MB]     (default 100)
//
// Uses the binaries of CARGO_TARGET_DIR/debug, or AGENTRUN_RELAY_BIN / AGENTRUN_SIDECAR_BIN.

import { startStack, waitFor, uniqueRun, binary, spawnTied } from '../lib/harness.mjs';

const MB = Number(process.argv[2] || 100);
const X = 'x'.repeat(100);
// Lines of 16 to 115 bytes, 66 on average.
const LINES = Math.round((MB * 1e6) / 66);
const lineOf = (i) => `line ${String(i).padStart(9, '0')} ${X.slice(0, i % 100)} end`;
const AGENT = `awk 'BEGIN { x = "${X}"; for (i = 1; i <= ${LINES}; i++) printf "line %09d %s end\\n", i, substr(x, 1, i % 100) }'`;

const s = await startStack();
const figures = {};
const time = async (name, fn) => {
  const t = Date.now();
  await fn();
  figures[name] = `${((Date.now() - t) / 1000).toFixed(2)} s`;
};
try {
  const run = uniqueRun('bench');
  const v = 'big';
  await time('agent writes the run (sidecar to Redis)', async () => {
    const agent = spawnTied(binary('agentrun-sidecar'), ['run', '--redis-url', s.redis.url, '--run-id', run, '--variation', v, '--quiet', '--', 'sh', '-c', AGENT], { stdio: 'ignore' });
    await new Promise((resolve) => agent.on('exit', resolve));
  });
  const { page } = s;
  const rowText = (n) => page.evaluate(([v, n]) => document.querySelector(`section.variation[data-variation="${v}"] pre.term .row[data-line="${n}"]:not(.pending)`)?.textContent ?? null, [v, n]);
  const footprint = async () => {
    const cdp = await page.context().newCDPSession(page);
    await cdp.send('HeapProfiler.collectGarbage');
    const { usedSize } = await cdp.send('Runtime.getHeapUsage');
    await cdp.detach();
    const nodes = await page.evaluate(() => document.getElementsByTagName('*').length);
    return `${(usedSize / 1048576).toFixed(1)} MiB heap, ${nodes} DOM nodes`;
  };

  await time('page open → last line shown (whole history received)', async () => {
    await page.goto(`${s.relay.url}/runs/${run}`);
    await waitFor('every line', async () => (await page.evaluate((v) => window.__agentrun.lines?.(v), v)) === LINES + 1, 600000, 200);
    await waitFor('the last line', async () => (await rowText(LINES)) === `${lineOf(LINES)}\n`, 60000);
  });
  figures['page after loading'] = await footprint();
  const scroller = page.locator(`section.variation[data-variation="${v}"] .output-scroll`);
  await time('scroll to the top → first line shown', async () => {
    await scroller.evaluate((el) => {
      el.scrollTop = 0;
    });
    await waitFor('the first line', async () => (await rowText(1)) === `${lineOf(1)}\n`, 60000, 20);
  });
  const middle = Math.floor(LINES / 2);
  await time('search for the middle line → shown', async () => {
    const input = page.locator(`section.variation[data-variation="${v}"] .out-search-input`);
    await input.fill(lineOf(middle));
    await input.press('Enter');
    await waitFor('the match', async () => (await rowText(middle)) === `${lineOf(middle)}\n`, 120000, 20);
  });
  const at = Math.floor(LINES * 0.37);
  await time('scroll to 37% → lines shown', async () => {
    await scroller.evaluate((el, n) => {
      el.scrollTop = (n - 1) * 18;
    }, at);
    await waitFor('the lines', async () => (await rowText(at + 5)) === `${lineOf(at + 5)}\n`, 60000, 20);
  });
  figures['page after scrolling'] = await footprint();
  const link = Math.floor(LINES * 0.8);
  await page.goto('about:blank');
  await time(`fresh load of a link to line ${link} → shown`, async () => {
    await page.goto(`${s.relay.url}/runs/${run}#${v}:L${link}`);
    await waitFor('the linked line', async () => (await rowText(link)) === `${lineOf(link)}\n`, 600000, 50);
  });
  console.log(`${MB} MB run: ${LINES} lines`);
  for (const [k, val] of Object.entries(figures)) console.log(`| ${k} | ${val} |`);
} finally {
  await s.close();
}
