// Progress output as a terminal shows it, through the real relay and a real agent run by
// `agentrun-sidecar run`: "\r" updates end as one line, an ESC[K spinner leaves only its last
// frame, a two-line bar redrawn with cursor-up stays two lines; the Raw view shows every byte
// the agent wrote, the Download link gives them back, and the stream in Redis is byte-exact
// whatever the page shows.

import test, { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startStack, waitFor, outputText, uniqueRun, binary, RedisClient, spawnTied } from './lib/harness.mjs';

let s;
before(async () => {
  s = await startStack();
});
after(async () => {
  await s?.close();
});

// printf escapes: \r, \033[K (erase to the end of the line), \033[2A (two lines up).
const AGENT = [
  "printf 'progress: 10%%\\rprogress: 50%%\\rprogress: 100%%\\n'",
  "for f in '|' / - +; do printf '\\r\\033[Kworking %s' \"$f\"; done; printf '\\r\\033[Kworked\\n'",
  "printf 'file 1/3\\nbar #\\n'",
  "printf '\\033[2A\\r\\033[Kfile 2/3\\n\\r\\033[Kbar ##\\n'",
  "printf '\\033[2A\\r\\033[Kfile 3/3\\n\\r\\033[Kbar ###\\n'",
  'echo done',
].join('; ');

const RAW = 'progress: 10%\rprogress: 50%\rprogress: 100%\n'
  + '\r\x1b[Kworking |\r\x1b[Kworking /\r\x1b[Kworking -\r\x1b[Kworking +\r\x1b[Kworked\n'
  + 'file 1/3\nbar #\n'
  + '\x1b[2A\r\x1b[Kfile 2/3\n\r\x1b[Kbar ##\n'
  + '\x1b[2A\r\x1b[Kfile 3/3\n\r\x1b[Kbar ###\n'
  + 'done\n';

/** What the Raw view shows for bytes: control characters as their visible symbols. */
const visible = (t) => t.replace(/[\x00-\x09\x0b-\x1f]/g, (c) => String.fromCharCode(0x2400 + c.charCodeAt(0)));

test('progress bars render as a terminal would; Raw shows every byte', async () => {
  const run = uniqueRun('term');
  const agent = spawnTied(binary('agentrun-sidecar'), ['run', '--redis-url', s.redis.url, '--run-id', run, '--variation', 'bar', '--quiet', '--', 'sh', '-c', AGENT], { stdio: 'ignore' });
  const code = await new Promise((resolve) => agent.on('exit', resolve));
  assert.equal(code, 0, 'the agent ran');

  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the whole output', async () => (await outputText(page, 'bar'))?.includes('done\n'), 20000);
  assert.equal(await outputText(page, 'bar'), 'progress: 100%\nworked\nfile 3/3\nbar ###\ndone\n');

  // The stream holds the agent's bytes, not what the page made of them.
  const redis = await RedisClient.connect(s.redis.port);
  const entries = await redis.command('XRANGE', `run:{${run}}:output:bar`, '-', '+');
  redis.close();
  const content = entries.map(([, fields]) => fields[fields.indexOf('content') + 1]).join('');
  assert.equal(content, RAW);

  // The Download link gives the same bytes, named after the run.
  const link = page.locator('section.variation[data-variation="bar"] a.download');
  assert.equal(await link.getAttribute('download'), `${run}-bar.txt`);
  const downloaded = await link.evaluate(async (a) => (await fetch(a.href)).text());
  assert.equal(downloaded, RAW);

  const raw = page.locator('section.variation[data-variation="bar"] button.raw-toggle');
  await raw.click();
  assert.equal(await raw.getAttribute('aria-pressed'), 'true');
  assert.equal(await outputText(page, 'bar'), visible(RAW));
  await raw.click();
  assert.equal(await outputText(page, 'bar'), 'progress: 100%\nworked\nfile 3/3\nbar ###\ndone\n');
});
