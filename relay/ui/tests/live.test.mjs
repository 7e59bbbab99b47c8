// The real relay serving the real UI: headers, the run list, and output, logs and status that
// appear on the page live as they are published to Redis.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startStack, waitFor, outputText, uniqueRun } from './lib/harness.mjs';

let s;
before(async () => {
  s = await startStack();
});
after(async () => {
  await s?.close();
});

test('UI responses carry the content types and the strict Content-Security-Policy', async () => {
  const cases = [
    ['/', /^text\/html/],
    ['/runs/anything', /^text\/html/],
    ['/ui/app.js', /^text\/javascript/],
    ['/ui/markdown.js', /^text\/javascript/],
    ['/ui/ansi.js', /^text\/javascript/],
    ['/ui/style.css', /^text\/css/],
    ['/ui/favicon.svg', /^image\/svg\+xml/],
  ];
  for (const [path, type] of cases) {
    const res = await fetch(`${s.relay.url}${path}`);
    assert.equal(res.status, 200, path);
    assert.match(res.headers.get('content-type'), type, path);
    const csp = res.headers.get('content-security-policy') || '';
    for (const d of ["default-src 'self'", "script-src 'self'", "style-src 'self'", "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"]) {
      assert.ok(csp.includes(d), `${path}: CSP ${JSON.stringify(csp)} lacks ${d}`);
    }
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/, path);
    assert.equal(res.headers.get('x-content-type-options'), 'nosniff', path);
    const etag = res.headers.get('etag');
    assert.ok(etag, `${path} has no ETag`);
    const again = await fetch(`${s.relay.url}${path}`, { headers: { 'if-none-match': etag } });
    assert.equal(again.status, 304, `${path} revalidation`);
  }
  assert.equal((await fetch(`${s.relay.url}/ui/nope.js`)).status, 404);
  assert.equal((await fetch(`${s.relay.url}/ui/..%2Fsrc%2Fui.rs`)).status, 404);
});

test('the run list shows runs with status badges and links to their pages', async () => {
  const run = uniqueRun('listed');
  const pub = s.publisher(run);
  await pub.register(['alpha', 'beta']);
  await pub.status('alpha', 'running');
  await pub.status('beta', 'pending', { reason: 'ErrImagePull', message: 'image "nope:1" not found' });
  await s.page.goto(`${s.relay.url}/`);
  const row = s.page.locator(`tr[data-run="${run}"]`);
  await waitFor('the run in the list', () => row.isVisible());
  assert.equal(await row.locator('td').nth(1).textContent(), 'running');
  // The list refreshes itself: a run registered now shows up without a reload.
  const later = uniqueRun('later');
  await s.publisher(later).register(['solo']);
  await s.publisher(later).status('solo', 'succeeded', { exitCode: 0 });
  await waitFor('the new run in the list', () => s.page.locator(`tr[data-run="${later}"]`).isVisible(), 15000);
  assert.equal(await s.page.locator('table.runs tbody tr').first().getAttribute('data-run'), later, 'newest first');
  await s.browser.screenshot('run-list');
  assert.match(await row.locator('.vars').textContent(), /alpha running\s*beta pending/);
  await row.locator('a').click();
  await waitFor('the run page', async () => new URL(s.page.url()).pathname === `/runs/${run}`);
  await waitFor('the pending reason', async () => /ErrImagePull · image "nope:1" not found/.test(await s.page.locator('section.variation[data-variation="beta"] .var-detail').textContent()));
});

test('output, logs and status appear live, side by side, and the stream ends with the run', async () => {
  const run = uniqueRun('live');
  const pub = s.publisher(run);
  await pub.register(['claude', 'codex']);
  await pub.status('claude', 'pending', { reason: 'Unschedulable', message: '0/3 nodes are available: 3 Insufficient cpu.' });
  await pub.output('claude', 'history before the page opened\n');
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the history', async () => (await outputText(page, 'claude'))?.includes('history before the page opened'));
  await waitFor('the pending reason in the timeline', async () => /Unschedulable · 0\/3 nodes are available/.test(await page.locator('.timeline').textContent()));
  assert.equal(await page.locator('#conn').getAttribute('data-state'), 'live');

  // Now, with the page open: each entry must show up without a reload.
  await pub.status('claude', 'running');
  await pub.status('codex', 'running');
  for (let i = 1; i <= 5; i++) {
    await pub.output('claude', `claude step ${i}\n`);
    await waitFor(`claude step ${i}`, async () => (await outputText(page, 'claude')).includes(`claude step ${i}\n`));
    await pub.output('codex', `# Plan ${i}\n\n- read the **code**\n- run \`cargo test\`\n\n`);
    await waitFor(`codex plan ${i}`, async () => (await outputText(page, 'codex')).includes(`# Plan ${i}`));
  }
  await pub.logs('claude', '{"timestamp":"2026-11-22T02:00:00Z","level":"WARN","fields":{"message":"rate limited","retryAfter":3},"target":"agent::api"}\n');
  const log = page.locator('section.variation[data-variation="claude"] .log-line');
  await waitFor('the JSON log line', async () => (await log.count()) === 1);
  assert.equal(await log.locator('.log-msg').textContent(), 'rate limited');
  assert.equal(await log.locator('.log-level').textContent(), 'warn');
  assert.equal(await log.locator('.log-field').textContent(), 'retryAfter=3');
  await pub.publish('metrics', [{ type: 'metrics', content: JSON.stringify({ variation: 'codex', bytesOut: 2048, chunks: 12 }) }]);
  await waitFor('metrics', async () => /bytesOut 2\.0 KiB/.test(await page.locator('section.variation[data-variation="codex"] .metrics').textContent()));

  // The Markdown view of codex.
  await page.locator('section.variation[data-variation="codex"] button.md-toggle').click();
  const md = page.locator('section.variation[data-variation="codex"] .markdown');
  await waitFor('rendered Markdown', async () => (await md.locator('h1').count()) === 5);
  assert.equal(await md.locator('li strong').first().textContent(), 'code');
  assert.equal(await md.locator('li code').first().textContent(), 'cargo test');
  await pub.output('codex', '# Plan 6\n');
  await waitFor('Markdown that updates live', async () => (await md.locator('h1').count()) === 6);

  assert.equal(await page.locator('section.variation').count(), 2);
  const [a, b] = await page.locator('section.variation').evaluateAll((els) => els.map((e) => e.getBoundingClientRect()));
  assert.ok(Math.abs(a.top - b.top) < 2 && b.left >= a.right, 'variations are not side by side');
  await s.browser.screenshot('run-page');

  await pub.finish(['claude', 'codex']);
  await waitFor('the end of the stream', async () => (await page.locator('#conn').getAttribute('data-state')) === 'ended', 20000);
  assert.equal(await page.locator('.run-title .badge').textContent(), 'succeeded');
  assert.deepEqual(s.browser.errors, []);
  assert.deepEqual(s.browser.cspViolations, []);
  assert.equal(await page.evaluate(() => window.__agentrun.duplicates), 0);
});

test('history trimmed from Redis is announced in the pane, not skipped silently', async () => {
  const run = uniqueRun('trimmed');
  const pub = s.publisher(run);
  await pub.register(['main']);
  for (let i = 1; i <= 50; i++) await pub.output('main', `entry ${i}\n`);
  await s.client.command('XTRIM', `run:{${run}}:output:main`, 'MAXLEN', '=', 10);
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the kept entries', async () => (await outputText(page, 'main'))?.includes('entry 50\n'));
  const text = await outputText(page, 'main');
  assert.match(text, /history trimmed: 40 earlier entries of output are no longer kept \(the stream now starts at entry 41\)/);
  assert.ok(text.endsWith(Array.from({ length: 10 }, (_, i) => `entry ${41 + i}\n`).join('')), text);
  assert.doesNotMatch(text, /entry 40\n|not received/);
});

test('a gap entry (data the sidecar had to drop) is shown where it happened', async () => {
  const run = uniqueRun('gap');
  const pub = s.publisher(run);
  await pub.register(['main']);
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the page to connect', async () => (await page.locator('#conn').getAttribute('data-state')) === 'live');
  await pub.output('main', 'before\n');
  await pub.publish('output:main', [{ type: 'gap', content: '', meta: { droppedBytes: 1048576, droppedChunks: 17 } }]);
  await pub.output('main', 'after\n');
  await waitFor('the output after the gap', async () => (await outputText(page, 'main'))?.includes('after\n'));
  assert.equal(await outputText(page, 'main'), 'before\n⚠ gap: 1.0 MiB, 17 chunks of output could not be kept and were dropped hereafter\n');
  assert.equal(await page.locator('section.variation[data-variation="main"] pre.term .marker-warn').count(), 1);
});

test('a page opened before its run exists picks the run up when it appears', async () => {
  const run = uniqueRun('early');
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the not-yet-known notice', () => page.locator('.notice').isVisible());
  const pub = s.publisher(run);
  await pub.register(['late']);
  await pub.status('late', 'running');
  await pub.output('late', 'finally here\n');
  await waitFor('the output of the new run', async () => (await outputText(page, 'late')) === 'finally here\n', 40000);
  await waitFor('the notice to go away', async () => !(await page.locator('.notice').isVisible()));
  assert.equal(await page.locator('section.variation[data-variation="late"] .var-title .badge').textContent(), 'running');
});
