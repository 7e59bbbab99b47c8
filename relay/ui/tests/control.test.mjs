// Pause, resume and stop from the page, through the real relay and real agents run by
// `agentrun-sidecar run`: pausing one variation stops its output while the other goes on,
// resuming continues it, a line typed for stdin reaches the agent, and stop ends the run. The control messages themselves are checked on
// the run's control channel too.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startStack, waitFor, outputText, uniqueRun, binary, RedisClient, spawnTied } from './lib/harness.mjs';

let s;
const agents = [];
let sub;
before(async () => {
  s = await startStack();
});
after(async () => {
  for (const a of agents) if (a.exitCode === null && a.signalCode === null) a.kill('SIGKILL');
  sub?.close();
  await s?.close();
});

const TICKER = 'i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo "tick $i"; sleep 0.05; done';
const ECHO = 'while read -r line; do echo "got: $line"; done';

function startAgent(run, variation, script = TICKER) {
  const child = spawnTied(binary('agentrun-sidecar'), ['run', '--redis-url', s.redis.url, '--run-id', run, '--variation', variation, '--quiet', '--stop-grace-seconds', '2', '--', 'sh', '-c', script], { stdio: ['ignore', 'ignore', 'pipe'] });
  child.log = '';
  child.stderr.on('data', (d) => {
    child.log = (child.log + d).slice(-5000);
  });
  agents.push(child);
  return child;
}

const ticks = async (page, v) => {
  const m = (await outputText(page, v) || '').match(/tick (\d+)\n/g);
  return m ? Number(m[m.length - 1].slice(5, -1)) : 0;
};
const badgeOf = (page, v) => page.locator(`section.variation[data-variation="${v}"] .var-title .badge`).textContent();

test('pause stops a variation\'s output, resume continues it, stop ends the run', async () => {
  const run = uniqueRun('ctl');
  const messages = [];
  sub = await RedisClient.connect(s.redis.port);
  await sub.subscribe(`run:{${run}}:control`, (_ch, payload) => messages.push(payload));

  startAgent(run, 'a');
  startAgent(run, 'b');
  startAgent(run, 'c', ECHO);
  await waitFor('the run to be registered', async () => {
    const r = await fetch(`${s.relay.url}/api/runs/${run}`);
    if (!r.ok) return false;
    const body = await r.json();
    return Object.keys(body.variations || {}).length === 3;
  }, 30000);
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('both agents to print', async () => (await ticks(page, 'a')) >= 5 && (await ticks(page, 'b')) >= 5, 30000);

  // Pause only variation a.
  await page.locator('section.variation[data-variation="a"] button[data-action="pause"]').click();
  await waitFor('a to be paused', async () => (await badgeOf(page, 'a')) === 'paused', 15000);
  let b0 = await ticks(page, 'b');
  await waitFor('b to go on', async () => (await ticks(page, 'b')) >= b0 + 5, 15000); // output in flight settles
  const aPaused = await ticks(page, 'a');
  b0 = await ticks(page, 'b');
  await waitFor('b to go on for another second', async () => (await ticks(page, 'b')) >= b0 + 20, 15000);
  assert.equal(await ticks(page, 'a'), aPaused, 'a printed while paused');
  assert.equal(await badgeOf(page, 'b'), 'running');

  // Resume it.
  await page.locator('section.variation[data-variation="a"] button[data-action="resume"]').click();
  await waitFor('a to print again', async () => (await ticks(page, 'a')) >= aPaused + 5, 15000);
  assert.equal(await badgeOf(page, 'a'), 'running');

  // A line for c's stdin, typed into its box.
  const box = page.locator('section.variation[data-variation="c"] .stdin-input');
  await box.fill('hello <b>agent</b>');
  await box.press('Enter');
  await waitFor('the agent to echo its stdin', async () => (await outputText(page, 'c')) === 'got: hello <b>agent</b>\n', 15000);
  assert.equal(await box.inputValue(), '');

  // Stop everything: the button asks for a second click first.
  const stop = page.locator('.run-actions button[data-action="stop"]');
  await stop.click();
  assert.equal(await stop.textContent(), 'Confirm stop');
  await stop.click();
  // The live page shows the stop; with two local sidecars on one run the first one to end
  // marks the run ended, so the relay may close the stream before the other's final status:
  // check both on a fresh load once the agents have exited.
  try {
    await waitFor('a variation to stop', async () => (await badgeOf(page, 'a')) === 'stopped' || (await badgeOf(page, 'b')) === 'stopped', 20000);
    await waitFor('the agent processes to exit', () => agents.every((a) => a.exitCode !== null || a.signalCode !== null), 20000);
    await page.reload();
    await waitFor('both agents stopped', async () => (await badgeOf(page, 'a')) === 'stopped' && (await badgeOf(page, 'b')) === 'stopped' && (await badgeOf(page, 'c')) === 'stopped', 20000);
  } catch (e) {
    const timeline = await page.locator('.timeline').textContent();
    const exits = agents.map((a) => `${a.exitCode}/${a.signalCode}: ${a.log.slice(-800)}`);
    throw new Error(`${e.message}; badges ${await badgeOf(page, 'a')}/${await badgeOf(page, 'b')}; control messages ${JSON.stringify(messages)}; timeline ${timeline}; agents ${JSON.stringify(exits)}`);
  }
  assert.equal(agents[0].exitCode ?? agents[0].signalCode, 143, 'the agent should exit as stopped by SIGTERM (128+15)');
  await s.browser.screenshot('controlled-run');

  const parsed = messages.map((m) => {
    // The Pub/Sub payload is "SEQ TS TYPE METALEN\n" + meta + content (agentrun_protocol::live).
    const nl = m.indexOf('\n');
    const [, , type, metaLen] = m.slice(0, nl).split(' ');
    assert.equal(type, 'control');
    return JSON.parse(m.slice(nl + 1 + Number(metaLen)));
  });
  assert.deepEqual(parsed, [{ action: 'pause', variation: 'a' }, { action: 'resume', variation: 'a' }, { action: 'stdin', variation: 'c', data: 'hello <b>agent</b>' }, { action: 'stop' }]);
  assert.deepEqual(s.browser.errors, []);
});

test('a refused control request is shown on the page', async () => {
  const { page } = s;
  // A run page for a run that does not exist: the relay answers 404.
  await page.goto(`${s.relay.url}/runs/${uniqueRun('missing')}`);
  await waitFor('the not-found notice', () => page.locator('.notice').isVisible());
  await page.locator('.run-actions button[data-action="pause"]').click();
  await waitFor('the error', () => page.locator('.page > .error').isVisible());
  assert.match(await page.locator('.page > .error').textContent(), /^pause failed: .*(not found|no run|404)/i);
});

test('a control action whose answer is lost is sent again with its key and applied once', async () => {
  const run = uniqueRun('lost');
  const pub = s.publisher(run);
  await pub.register(['main']);
  const { page } = s;
  const keys = [];
  let lost = false;
  await page.route(`**/api/runs/${run}/control`, async (route) => {
    keys.push(route.request().headers()['idempotency-key']);
    if (!lost) {
      // The relay gets the request and applies it; its answer never reaches the page.
      lost = true;
      await route.fetch();
      await route.abort('connectionreset');
      return;
    }
    await route.continue();
  });
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the page to connect', async () => (await page.locator('#conn').getAttribute('data-state')) === 'live');
  await page.locator('.run-actions button[data-action="pause"]').click();
  await waitFor('the page to send it again', () => keys.length >= 2, 15000);
  await waitFor('the action to be confirmed', async () => !(await page.locator('.run-actions button[data-action="pause"]').isDisabled()), 15000);
  assert.equal(await page.locator('.page > .error').isVisible(), false, 'no error is shown');
  assert.ok(/^[0-9a-f]{32}$/.test(keys[0]), `a random key: ${keys[0]}`);
  assert.equal(keys[1], keys[0], 'the retry carries the same key');
  assert.equal(await s.client.command('XLEN', `run:{${run}}:control`), 1, 'the pause reached the run once');
  await page.unroute(`**/api/runs/${run}/control`);
});
