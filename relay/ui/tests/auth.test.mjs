// The token prompt: a relay with --auth token answers 401; the page asks for a token, posts it to
// /api/session (an HttpOnly cookie the EventSource then carries) and never puts it in a URL.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RedisServer, RedisClient, RunPublisher, Relay, launchBrowser, waitFor, uniqueRun, bounded } from './lib/harness.mjs';

const TOKEN = 'ui-test-token-4b7e1c';
let redis;
let client;
let relay;
let browser;

before(async () => {
  const dir = mkdtempSync(join(tmpdir(), 'agentrun-ui-auth-'));
  writeFileSync(join(dir, 'tokens'), `${TOKEN}\n`);
  process.env.AGENTRUN_AUTH = 'token';
  process.env.AGENTRUN_TOKENS_FILE = join(dir, 'tokens');
  redis = await RedisServer.start();
  client = await RedisClient.connect(redis.port);
  relay = await Relay.start(redis.url);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  if (relay) await bounded(relay.stop('SIGKILL'), 15000, 'stopping the relay');
  client?.close();
  if (redis) await bounded(redis.stop(), 15000, 'stopping redis');
});

test('a 401 asks for a token, which becomes an HttpOnly cookie, never a URL', async () => {
  const run = uniqueRun('auth');
  await new RunPublisher(client, run).register(['a']);
  const { page } = browser;
  const urls = [];
  page.on('request', (r) => urls.push(r.url()));
  await page.goto(`${relay.url}/`);
  await waitFor('the token prompt', async () => (await page.locator('#token-prompt').count()) === 1);

  await page.fill('#token-prompt input', 'not-the-token');
  await page.click('#token-prompt button');
  await waitFor('the refusal', async () => /not accepted/.test(await page.locator('#token-prompt .token-error').textContent()));

  await page.fill('#token-prompt input', TOKEN);
  await page.click('#token-prompt button');
  await waitFor('the run list', async () => (await page.locator(`tr[data-run="${run}"]`).count()) === 1);
  assert.equal(await page.locator('#token-prompt').count(), 0);
  assert.equal(await page.evaluate(() => document.cookie), '', 'the cookie is HttpOnly');

  // The run page's EventSource authenticates with the cookie.
  await page.goto(`${relay.url}/runs/${encodeURIComponent(run)}`);
  await waitFor('the stream to connect', async () => (await page.locator('#conn').getAttribute('data-state')) === 'live');
  assert.equal(await page.locator('#token-prompt').count(), 0);
  for (const u of urls) assert.ok(!u.includes(TOKEN), `the token is in a URL: ${u}`);
  assert.ok(!relay.log.includes(TOKEN), 'the token is in the relay log');
});
