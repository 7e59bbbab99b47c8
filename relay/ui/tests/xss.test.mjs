// Untrusted output: hostile agent output, logs, status and metrics, published to Redis and
// streamed by the real relay, must never execute in the page, in the plain view or in the
// rendered Markdown view. Control characters and ANSI sequences are shown harmlessly, and huge
// lines do not freeze the page.

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

// Every payload tries to set window.__pwned or open a dialog.
const HOSTILE = [
  '<script>window.__pwned = "script"</script>',
  '<img src=x onerror="window.__pwned = \'img\'; alert(\'img\')">',
  '<svg onload="window.__pwned=\'svg\'"><circle r=1 /></svg>',
  '<iframe src="javascript:parent.__pwned=\'iframe\'"></iframe>',
  '<details open ontoggle="window.__pwned=\'details\'">x</details>',
  '<a href="javascript:window.__pwned=\'a\'" id="evil-a">raw anchor</a>',
  '[markdown link](javascript:window.__pwned=\'mdlink\')',
  '[spaced link]( javascript:alert(1) )',
  '[entity link](jav&#x61;script:alert(1))',
  '[data link](data:text/html,<script>alert(1)</script>)',
  '![image](javascript:alert(1))',
  '<javascript:alert(1)>',
  '<style>body { display: none }</style><link rel=stylesheet href="data:text/css,body{display:none}">',
  '<object data="javascript:alert(1)"></object><embed src="javascript:alert(1)">',
  '<form action="javascript:alert(1)"><button id="evil-btn">go</button></form>',
  '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
  '`</code><script>window.__pwned="code"</script>`',
  '```html\n</pre><img src=x onerror=alert(1)>\n```',
  '\x1b]8;;javascript:alert(1)\x1b\\osc8 link\x1b]8;;\x1b\\',
  '{{constructor.constructor("window.__pwned=\'tmpl\'")()}} ${alert(1)}',
  '[good link](https://example.com/safe)',
].join('\n\n');

async function assertInert(page, where) {
  const report = await page.evaluate(() => {
    // Everything that holds agent-controlled content (the page's own buttons and inputs are not).
    const cols = [...document.querySelectorAll('section.variation pre.term, section.variation .markdown, section.variation .log-lines, section.variation .var-detail, .timeline, .metrics')];
    const bad = [];
    for (const c of cols) {
      for (const e of c.querySelectorAll('script, img, svg, iframe, object, embed, style, link, meta, form, details, input, video, audio, base')) bad.push(e.outerHTML.slice(0, 80));
      for (const e of c.querySelectorAll('*')) {
        for (const a of e.attributes) if (/^on/i.test(a.name) || a.name === 'style' || a.name === 'src') bad.push(`${e.tagName} ${a.name}`);
      }
      for (const a of c.querySelectorAll('a')) {
        const href = a.getAttribute('href');
        if (href !== null && !/^https?:\/\//.test(href)) bad.push(`a href=${href}`);
        if (href !== null && !/noopener/.test(a.rel)) bad.push(`a without noopener: ${href}`);
      }
    }
    return { pwned: window.__pwned, bad, evil: !!document.getElementById('evil-a') || !!document.getElementById('evil-btn') };
  });
  assert.equal(report.pwned, undefined, `${where}: hostile output ran (${report.pwned})`);
  assert.deepEqual(report.bad, [], `${where}: active elements or attributes`);
  assert.equal(report.evil, false, `${where}: an element from the output became part of the page`);
  assert.deepEqual(s.browser.dialogs, [], `${where}: a dialog opened`);
  assert.deepEqual(s.browser.errors, [], `${where}: page errors`);
}

test('hostile output, logs, status and metrics never execute, in the plain and the Markdown view', async () => {
  const run = uniqueRun('xss');
  const pub = s.publisher(run);
  await pub.register(['evil', 'other']);
  await pub.status('evil', 'pending', { reason: '<img src=x onerror=alert(1)>', message: '<script>window.__pwned="status"</script>' });
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the page to connect', async () => (await page.locator('#conn').getAttribute('data-state')) === 'live');

  await pub.output('evil', HOSTILE + '\nEND-EVIL\n');
  await pub.output('other', HOSTILE.split('\n\n').reverse().join('\n') + '\nEND-OTHER\n');
  await pub.logs('evil', `{"level":"error","msg":"<img src=x onerror=alert(1)>","<svg onload=alert(1)>":"<script>alert(2)</script>"}\n<script>window.__pwned="log"</script>\n`);
  await pub.publish('metrics', [{ type: 'metrics', content: JSON.stringify({ variation: 'evil', '<img src=x onerror=alert(1)>': '<script>alert(1)</script>' }) }]);
  await waitFor('the hostile output', async () => (await outputText(page, 'evil'))?.includes('END-EVIL') && (await outputText(page, 'other'))?.includes('END-OTHER'));
  await waitFor('the hostile log lines', async () => (await page.locator('section.variation[data-variation="evil"] .log-line').count()) === 2);
  await waitFor('the hostile metrics', async () => (await page.locator('section.variation[data-variation="evil"] .metric').count()) === 1);

  // Shown as text, literally.
  const plain = await outputText(page, 'evil');
  assert.ok(plain.includes('<script>window.__pwned = "script"</script>'), plain.slice(0, 200));
  assert.ok(plain.includes('<img src=x onerror='));
  assert.match(await page.locator('section.variation[data-variation="evil"] .var-detail').textContent(), /<img src=x onerror=alert\(1\)> · <script>/);
  await assertInert(page, 'plain view');

  for (const v of ['evil', 'other']) await page.locator(`section.variation[data-variation="${v}"] button.md-toggle`).click();
  const md = page.locator('section.variation[data-variation="evil"] .markdown');
  await waitFor('the Markdown view', async () => (await md.locator('a').count()) >= 1 && (await md.textContent()).includes('END-EVIL'));
  await assertInert(page, 'Markdown view');
  // The one safe link is a real link; the unsafe ones are text only.
  const links = await md.locator('a').evaluateAll((as) => as.map((a) => [a.textContent, a.getAttribute('href'), a.rel, a.target]));
  assert.deepEqual(links, [['good link', 'https://example.com/safe', 'noopener noreferrer nofollow', '_blank']]);
  const mdText = await md.textContent();
  for (const label of ['markdown link', 'spaced link', 'data link', 'image: image']) assert.ok(mdText.includes(label), `${label} should remain as text`);

  // Clicking everything that looks clickable in the rendered views still runs nothing.
  for (const v of ['evil', 'other']) {
    const texts = page.locator(`section.variation[data-variation="${v}"] .markdown :is(span, code, p, li)`);
    const n = Math.min(await texts.count(), 40);
    for (let i = 0; i < n; i++) await texts.nth(i).click({ force: true, timeout: 2000 }).catch(() => {});
  }
  await assertInert(page, 'after clicks');
  await s.browser.screenshot('hostile-markdown');
  assert.deepEqual(s.browser.cspViolations, []);
});

test('ANSI sequences become styles, control characters are shown, and huge lines are capped', async () => {
  const run = uniqueRun('ctl');
  const pub = s.publisher(run);
  await pub.register(['tty']);
  const { page } = s;
  await page.goto(`${s.relay.url}/runs/${run}`);
  await waitFor('the page to connect', async () => (await page.locator('#conn').getAttribute('data-state')) === 'live');
  await pub.output('tty', 'status: \x1b[1;31mFAILED\x1b[0m \x1b]0;new title\x07\x1b[2J\x1b[H');
  await pub.output('tty', 'bell\x07 null\x00 bs\x08 \u202eevil\u202c done\n');
  const huge = 'A'.repeat(3 * 1024 * 1024);
  await pub.output('tty', huge);
  await pub.output('tty', '\nafter the huge line\n');
  await waitFor('the output after the huge line', async () => (await outputText(page, 'tty'))?.endsWith('after the huge line\n'), 30000);
  const t0 = Date.now();
  assert.equal(await page.evaluate(() => 1 + 1), 2);
  assert.ok(Date.now() - t0 < 1000, 'the page is not responsive');
  const text = await outputText(page, 'tty');
  assert.ok(text.length <= 256 * 1024 + 1024, `${text.length} characters kept in the page`);
  assert.match(await page.locator('section.variation[data-variation="tty"] .output-pane .trim-notice').textContent(), /MiB at the start of over-long lines is not shown here/);
  assert.ok(!text.includes('\x1b') && !text.includes('\x07') && !text.includes('\x00') && !text.includes('\u202e'), 'raw control characters reached the page');

  // The start of the output was trimmed away above; check the styling on fresh output.
  await pub.output('tty', 'status: \x1b[1;31mFAILED\x1b[0m \x1b]0;title\x07bell\x07 nul\x00 \u202eevil\u202c ok\n');
  await waitFor('the styled line', async () => (await outputText(page, 'tty')).endsWith('ok\n'));
  const red = page.locator('section.variation[data-variation="tty"] pre.term .a-fg1.a-b').last();
  assert.equal(await red.textContent(), 'FAILED');
  const ctl = await page.locator('section.variation[data-variation="tty"] pre.term .ctl').allTextContents();
  assert.ok(ctl.includes('\u2407') && ctl.includes('\u2400') && ctl.includes('<U+202E>'), JSON.stringify(ctl.slice(-6)));
  assert.equal(await page.title(), `${run} · agentrun`, 'an OSC sequence changed the title');
  await assertInert(page, 'control characters');
});
