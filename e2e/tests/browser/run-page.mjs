// Opens a run's page in headless chromium and reports what it shows, for the e2e scenario
// `a_browser_shows_the_live_output_of_a_run_on_the_cluster` (tests/common/browser.rs runs it).
//
//   node run-page.mjs URL VARIATION FIRST AFTER
//
// Prints one JSON line per step on stdout:
//   {"event":"loaded","text":...}  the variation's pane shows FIRST (the agent's first line);
//   {"event":"live","text":...}    it then shows AFTER, which the agent writes only once told to
//                                  (after "loaded"), without a reload;
//   {"event":"ended","badge":...,"conn":...,"text":...,"errors":[...],"csp":[...]}
//                                  the stream ended and the run's badge shows its final state;
//   {"event":"error","message":...} on any failure (then exit code 1).
// Every wait has its own deadline. The browser comes from the web UI tests' harness (Debian's
// chromium, headless, fresh profile, --no-sandbox ...), with its playwright-core from
// relay/ui/tests/node_modules.

import { launchBrowser, waitFor, outputText, bounded } from '../../../relay/ui/tests/lib/harness.mjs';

const [url, variation, first, after] = process.argv.slice(2);
const say = (event, fields) => process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);

let browser;
try {
  if (!url || !variation || !first || !after) throw new Error('usage: run-page.mjs URL VARIATION FIRST AFTER');
  browser = await launchBrowser();
  const { page } = browser;
  await page.goto(url);
  const text = () => outputText(page, variation);
  say('loaded', { text: await waitFor(`the pane of ${variation} showing ${JSON.stringify(first)}`, async () => ((await text()) || '').includes(first) && text(), 30000) });
  say('live', { text: await waitFor(`the pane of ${variation} showing ${JSON.stringify(after)} without a reload`, async () => ((await text()) || '').includes(after) && text(), 30000) });
  const conn = () => page.locator('#conn').getAttribute('data-state');
  await waitFor('the end of the stream (#conn data-state=ended)', async () => (await conn()) === 'ended', 30000);
  say('ended', {
    badge: await page.locator('.run-title .badge').textContent(),
    conn: await conn(),
    text: await text(),
    errors: browser.errors,
    csp: browser.cspViolations,
  });
} catch (e) {
  say('error', { message: String(e && e.stack ? e.stack : e) });
  process.exitCode = 1;
} finally {
  if (browser) await bounded(browser.close(), 20000, 'closing the browser');
}
