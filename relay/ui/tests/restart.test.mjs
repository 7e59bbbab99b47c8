// A relay restart (graceful, then a crash), a network drop and a proxy error in the middle of a
// run: the open page reconnects by itself and ends up with every line exactly once, in order.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startStack, waitFor, uniqueRun, TcpProxy } from './lib/harness.mjs';

let s;
let proxy;
before(async () => {
  s = await startStack();
  proxy = await TcpProxy.start(s.relay.port);
});
after(async () => {
  await s?.browser.close(); // first, so that nothing reconnects through the proxy
  await proxy?.close();
  await s?.close();
});

test('relay restarts mid-run lose and duplicate nothing on the page', async () => {
  const run = uniqueRun('restart');
  const pub = s.publisher(run);
  await pub.register(['main']);
  await pub.status('main', 'running');
  const { page } = s;
  await page.goto(`${proxy.url}/runs/${run}`); // through a proxy whose connections can be cut
  await waitFor('the page to connect', async () => (await page.locator('#conn').getAttribute('data-state')) === 'live');
  await page.evaluate(() => {
    window.__samePage = true;
  });

  // A producer that keeps writing numbered lines until told to stop.
  let published = 0;
  let stop = false;
  const producer = (async () => {
    while (!stop && published < 20000) {
      await pub.output('main', `line ${published + 1}\n`);
      published++;
      await new Promise((r) => setTimeout(r, 3));
    }
  })();
  // The pane holds line n (it shows only the rows in view, so ask it rather than the DOM).
  const shows = (n) => async () => (await page.evaluate((k) => window.__agentrun.text('main', k, k), n)) === `line ${n}\n`;

  await waitFor('the first 100 lines', shows(100), 20000);
  // 1. Graceful restart: the relay ends the stream with a resumable cursor.
  await s.relay.stop('SIGTERM');
  const whileDown1 = published;
  await waitFor('lines published while the relay is down', () => published >= whileDown1 + 100);
  await s.relay.spawn();
  const mark1 = published;
  await waitFor(`line ${mark1} after the graceful restart`, shows(mark1), 30000);

  // 2. Crash: the connection just breaks.
  await s.relay.stop('SIGKILL');
  const whileDown2 = published;
  await waitFor('lines published while the relay is gone', () => published >= whileDown2 + 100);
  await s.relay.spawn();
  const mark2 = published;
  await waitFor(`line ${mark2} after the crash`, shows(mark2), 30000);

  // 3. The network drops the connection while the relay stays up.
  const beforeCut = published;
  await waitFor('lines after the crash', () => published >= beforeCut + 50);
  assert.ok(proxy.cut() >= 1, 'no connection to cut');
  const mark3 = published;
  await waitFor('lines after the network drop', () => published >= mark3 + 100);
  await waitFor(`line ${published} after the network drop`, shows(published), 30000);

  // 4. A proxy answers 502 while the backend is away: the browser's EventSource gives up, and
  // the page reconnects by itself with its last cursor (?from=).
  proxy.badGateway = true;
  proxy.cut();
  await waitFor('the page to notice', async () => /retrying/.test(await page.locator('#conn').textContent()), 20000);
  const mark4 = published;
  await waitFor('lines while the page is disconnected', () => published >= mark4 + 50);
  proxy.badGateway = false;
  await waitFor(`line ${published} after the page reconnected itself`, shows(published), 30000);

  stop = true;
  await producer;
  await pub.finish(['main']);
  await waitFor('the end of the run', async () => (await page.locator('#conn').getAttribute('data-state')) === 'ended', 30000);

  // The pane shows only the rows in view; what it holds is checked through its own record:
  // every line counted once (no duplicate, none missing), and the text of the lines it keeps.
  assert.equal(await page.evaluate(() => window.__agentrun.lines('main')), published + 1, 'lines counted by the page');
  const kept = Math.max(1, published - 8000);
  const expected = Array.from({ length: published - kept + 1 }, (_, i) => `line ${kept + i}\n`).join('');
  const shown = await page.evaluate((from) => window.__agentrun.text('main', from), kept);
  if (shown !== expected) {
    const lines = shown.split('\n');
    const seen = new Map();
    for (const l of lines) seen.set(l, (seen.get(l) || 0) + 1);
    const dupes = [...seen].filter(([l, n]) => n > 1 && l).slice(0, 5);
    const missing = [];
    for (let i = kept; i <= published && missing.length < 5; i++) if (!seen.has(`line ${i}`)) missing.push(i);
    assert.fail(`page differs from what was published (${published} lines): duplicates ${JSON.stringify(dupes)}, missing ${JSON.stringify(missing)}`);
  }
  assert.equal(await page.evaluate(() => window.__samePage), true, 'the page was reloaded');
  const stats = await page.evaluate(() => JSON.parse(JSON.stringify(window.__agentrun)));
  assert.equal(stats.duplicates, 0, 'the relay sent entries the page already had');
  assert.ok(stats.connects >= 5, `the page connected ${stats.connects} times; expected the first connection and four reconnections`);
  assert.deepEqual(s.browser.errors, []);
});
