// Ten tabs following ten runs through one relay over HTTPS. Browsers open at most six
// HTTP/1.1 connections to a host and an SSE stream holds one, so over HTTP/1.1 the seventh tab
// would wait; over HTTP/2 (the relay's --tls-cert/--tls-key) every tab's stream shares one
// connection and every tab is live.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  RedisServer, RedisClient, RunPublisher, Relay, launchBrowser, localhostCertificate,
  waitFor, outputText, uniqueRun, bounded,
} from './lib/harness.mjs';

const TABS = 10;
let redis, client, relay, browser, cert;

before(async () => {
  cert = localhostCertificate();
  redis = await RedisServer.start();
  client = await RedisClient.connect(redis.port);
  relay = await Relay.start(redis.url, undefined, { tls: cert });
  // The certificate is the test's own: the browser is told to accept it.
  browser = await launchBrowser({ ignoreHTTPSErrors: true });
});

after(async () => {
  await browser?.close();
  await bounded(relay?.stop('SIGKILL') ?? Promise.resolve(), 15000, 'stopping the relay');
  client?.close();
  await bounded(redis?.stop() ?? Promise.resolve(), 15000, 'stopping redis');
  cert?.remove();
});

test(`${TABS} tabs on ${TABS} runs over HTTP/2 are all live`, async () => {
  const runs = [];
  for (let i = 0; i < TABS; i++) {
    const run = uniqueRun(`tab${i}`);
    const pub = new RunPublisher(client, run);
    await pub.register(['main']);
    await pub.status('main', 'running');
    await pub.publish('output:main', [{ type: 'output', content: `tab ${i} first\n` }]);
    runs.push({ run, pub });
  }
  const pages = [];
  for (const { run } of runs) {
    const page = pages.length === 0 ? browser.page : await browser.context.newPage();
    await page.goto(`${relay.url}/runs/${run}`);
    pages.push(page);
  }
  for (let i = 0; i < TABS; i++) {
    await waitFor(`tab ${i} to show its history`, async () => (await outputText(pages[i], 'main'))?.includes(`tab ${i} first`), 20000);
    const protocol = await pages[i].evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
    assert.equal(protocol, 'h2', `tab ${i} talks HTTP/2`);
  }
  // Live: a line published now reaches every tab while all ten streams are open.
  for (let i = 0; i < TABS; i++) {
    await runs[i].pub.publish('output:main', [{ type: 'output', content: `tab ${i} live\n` }]);
  }
  for (let i = 0; i < TABS; i++) {
    await waitFor(`tab ${i} to show its live line`, async () => (await outputText(pages[i], 'main'))?.includes(`tab ${i} live`), 20000);
  }
});
