// A run whose history is written again (Redis lost entries, and the stream restarts at seq 1):
// the relay says so with `event: reset`, and the open page clears its panes, shows a notice and
// the run's history again from its first entry, once.

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

test('a reset history clears the page, says so, and shows the new history once', async () => {
  const run = uniqueRun('reset');
  const pub = s.publisher(run);
  await pub.register(['main']);
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the page to connect', async () => (await page.locator('#conn').getAttribute('data-state')) === 'live');
  for (let i = 1; i <= 3; i++) await pub.output('main', `old ${i}\n`);
  await waitFor('the old lines', async () => (await outputText(page, 'main')) === 'old 1\nold 2\nold 3\n');
  assert.equal(await page.locator('.reset-notice').isVisible(), false);
  // The Raw and Markdown views are on when the history resets.
  const toggle = (cls) => page.locator(`section.variation[data-variation="main"] button.${cls}`);
  await toggle('raw-toggle').click();
  await toggle('md-toggle').click();
  assert.equal(await toggle('raw-toggle').getAttribute('aria-pressed'), 'true');

  // Redis loses the stream and the producers hash its record of it (the producer's last pseq
  // and the stream's top); the stream is written again.
  await s.client.command('DEL', pub.key('output:main'));
  await s.client.command('HDEL', pub.key('producers'), `${pub.key('output:main')}|${pub.producer}`, pub.key('output:main'));
  pub.pseq.delete('output:main');
  await pub.output('main', 'new 1\n');
  await pub.output('main', 'new 2\n');

  await waitFor('the reset notice', () => page.locator('.reset-notice').isVisible());
  assert.match(await page.locator('.reset-notice').textContent(), /History reset/);
  await waitFor('the new history', async () => (await outputText(page, 'main')) === 'new 1\nnew 2\n');
  // The panes start over as they are when a page opens: neither Raw nor Markdown.
  assert.equal(await toggle('raw-toggle').getAttribute('aria-pressed'), 'false');
  assert.equal(await toggle('md-toggle').getAttribute('aria-pressed'), 'false');
  assert.equal(await page.locator('section.variation[data-variation="main"] .markdown').isVisible(), false);
  await pub.output('main', 'new 3\n');
  await waitFor('live lines after the reset', async () => (await outputText(page, 'main')) === 'new 1\nnew 2\nnew 3\n');
  const stats = await page.evaluate(() => JSON.parse(JSON.stringify(window.__agentrun)));
  assert.equal(stats.resets, 1);
  assert.equal(stats.duplicates, 0);
  await s.browser.screenshot('reset-history');
  assert.deepEqual(s.browser.errors, []);
});
