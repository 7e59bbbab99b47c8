// Run history that outlives Redis: a run the real agentrun-sidecar ran is archived by the real
// agentrun-archiver into a folder store and into a real S3 API (s3s-fs), Redis lets its keys
// go, and the relay (with `--archive-url`) still serves it. The run list shows it among the live runs, with filters
// and pages; its page looks like a finished live run: every line, scrolled back (read again
// from the archive), searched, and downloaded byte for byte.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Archiver, S3Server, RedisServer, RedisClient, Relay, RunPublisher, launchBrowser, waitFor, binary, spawnTied, uniqueRun, bounded } from './lib/harness.mjs';

const LINES = 20_000; // more than the 40 blocks of 256 lines a pane keeps: scrolling back reads the archive
const LIVE_RUNS = 52; // more than a page of the run list (50)
/** Line i (from 1) as the agent writes it. */
const lineOf = (i) => `archived line ${String(i).padStart(5, '0')}${i === 12_345 ? ' needle' : ''}`;
const AGENT = `awk 'BEGIN { for (i = 1; i <= ${LINES}; i++) printf "archived line %05d%s\\n", i, (i == 12345 ? " needle" : "") }'; exit 3`;

const rows = (page) => page.locator('table.runs tbody tr');
const rowIds = (page) => page.locator('table.runs tbody tr').evaluateAll((trs) => trs.map((tr) => tr.dataset.run));

/** The text of a row of the pane, once it is in the DOM and loaded. */
function rowText(page, n) {
  return page.evaluate((n) => {
    const row = document.querySelector(`section.variation[data-variation="main"] pre.term .row[data-line="${n}"]:not(.pending)`);
    return row ? row.textContent : null;
  }, n);
}

for (const kind of ['folder', 's3']) {
  describe(`runs archived in ${kind === 's3' ? 'an S3' : 'a folder'} store`, () => {
    let redis;
    let client;
    let relay;
    let archiver;
    let browser;
    let store; // the folder, or the S3 server
    let storeUrl;
    let storeEnv;
    let archived;
    let live;
    let want;

    before(async () => {
      archived = uniqueRun('old-job');
      live = [];
      redis = await RedisServer.start();
      client = await RedisClient.connect(redis.port);
      if (kind === 's3') {
        store = await S3Server.start();
        storeUrl = store.url;
        storeEnv = store.env;
      } else {
        store = mkdtempSync(join(tmpdir(), 'agentrun-ui-archive-'));
        storeUrl = store;
        storeEnv = {};
      }

      // The run to archive: the agent fails (exit 3) after writing every line.
      const agent = spawnTied(binary('agentrun-sidecar'), ['run', '--redis-url', redis.url, '--run-id', archived, '--variation', 'main', '--quiet', '--', 'sh', '-c', AGENT], { stdio: 'ignore' });
      const code = await new Promise((resolve) => agent.on('exit', resolve));
      assert.equal(code, 3, 'the agent ran and failed as written');
      const bytes = Array.from({ length: LINES }, (_, i) => `${lineOf(i + 1)}\n`).join('');
      want = { length: Buffer.byteLength(bytes), sha256: createHash('sha256').update(bytes).digest('hex') };
      const state = `run:{${archived}}:state`;
      await client.command('HSET', state, 'namespace', 'team-a', 'name', 'old-job');
      assert.equal(await client.command('HGET', state, 'phase'), 'failed');

      // Archived as the operator asks when a run ends; Redis drops the keys a second after.
      archiver = await Archiver.start(redis.url, storeUrl, storeEnv);
      await Archiver.enqueue(client, archived, 1);
      await waitFor(`the archive of ${archived} to be complete and its Redis keys gone (archiver log: ${archiver.log})`, async () => {
        const keys = await client.command('KEYS', `run:{${archived}}:*`);
        return Array.isArray(keys) && keys.length === 0;
      }, 60000, 200);

      // Newer runs, still in Redis: more than a page of them.
      for (let i = 0; i < LIVE_RUNS; i++) {
        const run = uniqueRun(`live-${String(i).padStart(2, '0')}`);
        const p = new RunPublisher(client, run);
        await p.register(['main'], { namespace: 'team-b', name: `live-${i}` });
        await p.output('main', `live run ${i}\n`);
        if (i % 2 === 0) await p.finish(['main'], 'succeeded');
        live.push(run);
      }

      relay = await Relay.start(redis.url, undefined, { archive: storeUrl, env: storeEnv });
      browser = await launchBrowser();
    });

    after(async () => {
      await browser?.close();
      await bounded(relay?.stop('SIGKILL') ?? Promise.resolve(), 15000, 'stopping the relay');
      await bounded(archiver?.stop() ?? Promise.resolve(), 15000, 'stopping the archiver');
      client?.close();
      await bounded(redis?.stop() ?? Promise.resolve(), 15000, 'stopping redis');
      if (store instanceof S3Server) await bounded(store.stop(), 15000, 'stopping s3s-fs');
      else if (store) rmSync(store, { recursive: true, force: true });
    });

    test('the run list pages through live and archived runs, newest first, and filters them', async () => {
      const { page } = browser;
      await page.goto(`${relay.url}/`);
      await waitFor('the first page of runs', async () => (await rows(page).count()) === 50);
      const first = await rowIds(page);
      assert.ok(!first.includes(archived), 'the archived run is the oldest: not on the first page');
      assert.equal(first[0], live[LIVE_RUNS - 1], 'newest first');
      assert.equal(await page.locator('button.more').isVisible(), true, 'a next page is offered');

      await page.locator('button.more').click();
      await waitFor('the second page', async () => (await rows(page).count()) === LIVE_RUNS + 1);
      const all = await rowIds(page);
      assert.equal(new Set(all).size, all.length, `a run listed twice: ${all}`);
      assert.deepEqual([...all].sort(), [...live, archived].sort());
      assert.equal(all[all.length - 1], archived);
      const row = page.locator(`table.runs tbody tr[data-run="${archived}"]`);
      assert.equal(await row.getAttribute('data-archived'), 'true');
      assert.equal(await row.locator('.badge').first().textContent(), 'failed');
      assert.match(await row.textContent(), /team-a\/old-job/);
      assert.match(await row.textContent(), /archived/);
      assert.equal(await page.locator('button.more').isVisible(), false, 'no page after the last');
      assert.equal(await page.locator('p.paused').isVisible(), true, 'says the list no longer refreshes');
      await browser.screenshot(`archive-run-list-${kind}`);

      // Phase: only the archived run failed.
      await page.selectOption('form.filters select', 'failed');
      await waitFor('only the failed run', async () => JSON.stringify(await rowIds(page)) === JSON.stringify([archived]));
      assert.match(page.url(), /\?phase=failed$/);
      // Namespace: the live runs, a page of them.
      await page.selectOption('form.filters select', '');
      await page.locator('form.filters input[aria-label="Namespace"]').fill('team-b');
      await page.locator('form.filters button[type="submit"]').click();
      await waitFor('the team-b runs', async () => {
        const ids = await rowIds(page);
        return ids.length === 50 && !ids.includes(archived);
      });
      // Name: part of the run's name finds the archived run.
      await page.locator('form.filters input[aria-label="Namespace"]').fill('');
      await page.locator('form.filters input[aria-label="Name contains"]').fill('old-job');
      await page.locator('form.filters button[type="submit"]').click();
      await waitFor('the archived run by name', async () => JSON.stringify(await rowIds(page)) === JSON.stringify([archived]));
      // The filters are in the URL: a reload keeps them.
      await page.reload();
      await waitFor('the filtered list after a reload', async () => JSON.stringify(await rowIds(page)) === JSON.stringify([archived]));
      assert.equal(await page.locator('form.filters input[aria-label="Name contains"]').inputValue(), 'old-job');
      await page.locator(`table.runs a[href="/runs/${archived}"]`).click();
      await page.waitForURL(`${relay.url}/runs/${archived}`);
    });

    test('an archived run looks like a finished live run: every line, scrolled back, searched, downloaded', async () => {
      const { page } = browser;
      await page.goto(`${relay.url}/runs/${archived}`);
      await waitFor('every line', async () => (await page.evaluate(() => window.__agentrun.lines?.('main'))) === LINES + 1, 30000);
      await waitFor('the end of the run', async () => (await page.locator('#conn').getAttribute('data-state')) === 'ended');
      assert.equal(await page.locator('section.variation[data-variation="main"]').getAttribute('data-state'), 'failed');
      assert.match(await page.locator('.run-detail').first().textContent(), /read from the archive/);
      assert.equal(await page.evaluate(() => window.__agentrun.duplicates), 0);
      // Nothing is left to pause, stop or type to.
      const open = await page.locator('.controls button, form.stdin input, form.stdin button').evaluateAll((es) => es.filter((e) => !e.disabled).map((e) => e.outerHTML));
      assert.deepEqual(open, [], 'controls still enabled');
      await waitFor('the last line', async () => (await rowText(page, LINES)) === `${lineOf(LINES)}\n`);

      // Scrolled to the top: the first lines are read again, from the archive (Redis has none).
      await page.locator('section.variation[data-variation="main"] .output-scroll').evaluate((el) => {
        el.scrollTop = 0;
      });
      await waitFor('the first line', async () => (await rowText(page, 1)) === `${lineOf(1)}\n`);
      assert.equal(await rowText(page, 2), `${lineOf(2)}\n`);

      // Search reads the archive too.
      const search = page.locator('section.variation[data-variation="main"] .out-search-input');
      await search.fill('needle');
      await search.press('Enter');
      await waitFor('the match', async () => (await rowText(page, 12_345)) === `${lineOf(12_345)}\n`, 20000);
      assert.equal(await page.locator('section.variation[data-variation="main"] .out-search-status').textContent(), '1 of 1');

      // The download is the agent's bytes.
      const href = await page.locator('section.variation[data-variation="main"] a.download').getAttribute('href');
      const got = await page.evaluate(async (href) => {
        const res = await fetch(href);
        const buf = await res.arrayBuffer();
        const digest = await crypto.subtle.digest('SHA-256', buf);
        return { status: res.status, length: buf.byteLength, sha256: [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('') };
      }, href);
      assert.deepEqual(got, { status: 200, ...want });
      await browser.screenshot(`archive-run-page-${kind}`);
    });
  });
}
