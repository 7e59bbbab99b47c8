// The page's own behaviour, against a scripted server (lib/fake-relay.mjs) that can misbehave
// on purpose: duplicates and skipped sequence numbers, gaps, JSON logs and the level filter,
// pending reasons, auto-scroll, and the size cap of the output pane.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { FakeRelay } from './lib/fake-relay.mjs';
import { launchBrowser, waitFor, outputText } from './lib/harness.mjs';

let relay;
let browser;

before(async () => {
  relay = await new FakeRelay().listen();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await relay?.close();
});

const env = (channel, variation, seq, content, extra = {}) => ({ run: 'r1', variation, channel, seq, ts: Date.now(), type: channel, content, meta: null, ...extra });

test('a run page shows variations, status reasons, output, gaps and JSON logs', async () => {
  relay.runs.r1 = { created: String(Date.now()), variations: 'alpha,beta', 'var:alpha': JSON.stringify({ variation: 'alpha', state: 'running' }), 'var:beta': JSON.stringify({ variation: 'beta', state: 'pending', reason: 'Unschedulable', message: '0/3 nodes are available: 3 Insufficient memory.' }) };
  const { page } = browser;
  await page.goto(`${relay.url}/runs/r1`);
  await waitFor('two variation columns', async () => (await page.locator('section.variation').count()) === 2);
  assert.match(await page.locator('section.variation[data-variation="beta"] .var-detail').textContent(), /Unschedulable · 0\/3 nodes are available/);
  await waitFor('the event stream to connect', () => relay.clients.size === 1);

  relay.send('status', 's1', env('status', null, 1, JSON.stringify({ variation: 'alpha', state: 'running', source: 'sidecar' })));
  relay.send('output', 'o1', env('output', 'alpha', 1, 'hello \x1b[32mgreen\x1b[0m\n'));
  relay.send('output', 'o2', env('output', 'alpha', 2, 'second line\n'));
  relay.send('output', 'o2', env('output', 'alpha', 2, 'second line\n')); // duplicate
  relay.send('output', 'o1', env('output', 'alpha', 1, 'hello \x1b[32mgreen\x1b[0m\n')); // older duplicate
  relay.send('output', 'o5', env('output', 'alpha', 5, 'after a hole\n')); // 3 and 4 never came
  relay.send('gap', 'o6', env('output', 'alpha', 6, '', { type: 'gap', meta: { droppedBytes: 4096, droppedChunks: 2 } }));
  relay.send('output', 'b1', env('output', 'beta', 1, 'beta says hi\n'));
  relay.send('output', 'b2', env('output', 'beta', 2, 'aGVsbG8g', { encoding: 'base64' })); // "hello "
  relay.send('output', 'b3', env('output', 'beta', 3, '8J+Y', { encoding: 'base64' })); // first 3 bytes of 😀
  relay.send('output', 'b4', env('output', 'beta', 4, 'gA==', { encoding: 'base64' })); // its last byte
  relay.send('logs', 'l1', env('logs', 'alpha', 1, '{"timestamp":"2026-11-22T01:00:00Z","level":"INFO","fields":{"message":"listening","port":8080},"target":"agent"}\n{"level":"debug","msg":"tick"}\nplain stderr line\n'));
  relay.send('logs', 'l2', env('logs', 'alpha', 2, '{"level":"error","msg":"boom","code":7}\n'));

  await waitFor('the last output of alpha', async () => (await outputText(page, 'alpha'))?.includes('after a hole'));
  const alpha = await outputText(page, 'alpha');
  assert.equal(alpha.match(/second line/g).length, 1, 'duplicate entries were shown twice');
  assert.equal(alpha.match(/hello green/g).length, 1, alpha);
  assert.match(alpha, /entries 3–4 of this stream were not received/);
  await waitFor('the gap marker', async () => /gap: 4\.0 KiB, 2 chunks of output/.test(await outputText(page, 'alpha')));
  assert.equal(await page.locator('section.variation[data-variation="alpha"] pre.term .a-fg2').textContent(), 'green');
  await waitFor('beta output decoded across chunks', async () => (await outputText(page, 'beta')) === 'beta says hi\nhello 😀');
  assert.equal(await page.evaluate(() => window.__agentrun.duplicates), 2);

  const logs = page.locator('section.variation[data-variation="alpha"] .log-line');
  await waitFor('four log lines', async () => (await logs.count()) === 4);
  const first = logs.nth(0);
  assert.equal(await first.locator('.log-level').textContent(), 'info');
  assert.equal(await first.locator('.log-msg').textContent(), 'listening');
  assert.equal(await first.locator('.log-field').textContent(), 'port=8080');
  assert.equal(await logs.nth(3).getAttribute('data-level'), 'error');
  await page.selectOption('#log-level', 'warn');
  const visible = await page.locator('section.variation[data-variation="alpha"] .log-line:visible').allTextContents();
  assert.equal(visible.length, 2, `visible at warn: ${JSON.stringify(visible)}`); // the error and the level-less line
  assert.ok(visible.some((t) => t.includes('boom')) && visible.some((t) => t.includes('plain stderr line')));
  await page.selectOption('#log-level', 'trace');

  assert.match(await page.locator('.timeline').textContent(), /alpha.*running/);
  relay.send('status', 's2', env('status', null, 2, JSON.stringify({ variation: 'beta', state: 'failed', reason: 'OOMKilled', exitCode: 137 })));
  await waitFor('beta to fail', async () => (await page.locator('section.variation[data-variation="beta"]').getAttribute('data-state')) === 'failed');
  assert.match(await page.locator('section.variation[data-variation="beta"] .var-detail').textContent(), /OOMKilled · exit code 137/);
  await browser.screenshot('fake-run-page');
});

test('auto-scroll follows new output, stops when the user scrolls up, resumes at the bottom', async () => {
  const { page } = browser;
  const scroller = page.locator('section.variation[data-variation="alpha"] .output-scroll');
  const atBottom = () => scroller.evaluate((s) => s.scrollHeight - s.scrollTop - s.clientHeight <= 4);
  let seq = 100;
  const burst = (n) => {
    for (let k = 0; k < n; k++) {
      seq++;
      relay.send('output', `o${seq}`, env('output', 'alpha', seq, `line ${seq}\n`));
    }
  };
  burst(200);
  await waitFor('output to overflow and follow', async () => (await scroller.evaluate((s) => s.scrollHeight > s.clientHeight * 2)) && (await atBottom()));
  await scroller.hover();
  await page.mouse.wheel(0, -600);
  await waitFor('the follow button', () => page.locator('section.variation[data-variation="alpha"] .output-pane .follow').isVisible());
  const top = await scroller.evaluate((s) => s.scrollTop);
  // The new lines are below the view, so not in the DOM (only the rows in view are): wait
  // until the pane has them.
  const lines = () => page.locator('section.variation[data-variation="alpha"] .output-pane').evaluate((p) => Number(p.dataset.lines));
  const want = (await lines()) + 100;
  burst(100);
  await waitFor('the new output', async () => (await lines()) >= want);
  await new Promise((r) => setTimeout(r, 200)); // let a (wrong) auto-scroll happen if it would
  assert.equal(await scroller.evaluate((s) => s.scrollTop), top, 'the pane scrolled although the user had scrolled up');
  await page.locator('section.variation[data-variation="alpha"] .output-pane .follow').click();
  await waitFor('the pane to be at the bottom again', atBottom);
  burst(100);
  await waitFor('the pane to follow again', async () => (await outputText(page, 'alpha')).includes(`line ${seq}\n`) && (await atBottom()));
});

test('huge output is capped in the page and the page stays responsive', async () => {
  const { page } = browser;
  let seq = 1000;
  const line = 'x'.repeat(1024 * 1024); // 1 MiB without a newline
  for (let k = 0; k < 4; k++) relay.send('output', `h${k}`, env('output', 'beta', ++seq, line));
  relay.send('output', 'hend', env('output', 'beta', ++seq, 'END\n'));
  await waitFor('the end marker', async () => (await outputText(page, 'beta'))?.endsWith('END\n'), 30000);
  const len = (await outputText(page, 'beta')).length;
  assert.ok(len <= 256 * 1024 + 1000, `the pane holds ${len} characters`);
  assert.match(await page.locator('section.variation[data-variation="beta"] .output-pane .trim-notice').textContent(), /at the start of over-long lines is not shown here/);
  const t0 = Date.now();
  await page.evaluate(() => 1);
  assert.ok(Date.now() - t0 < 1000, 'the page did not answer within a second');
});

test('the page reconnects by itself and resumes from its last event id', async () => {
  const { page } = browser;
  const before = relay.connections;
  relay.dropAll();
  await waitFor('a new connection', () => relay.connections > before && relay.clients.size === 1, 20000);
  assert.equal(relay.lastEventIds.at(-1), 'hend');
  relay.send('output', 'after', env('output', 'beta', 2000, 'after reconnect\n'));
  await waitFor('output after the reconnect', async () => (await outputText(page, 'beta')).endsWith('after reconnect\n'));
  relay.send('end', 'fin', {});
  await waitFor('the ended indicator', async () => (await page.locator('#conn').getAttribute('data-state')) === 'ended');
  assert.deepEqual(browser.dialogs, []);
  assert.deepEqual(browser.errors, []);
  assert.deepEqual(browser.cspViolations, []);
});
