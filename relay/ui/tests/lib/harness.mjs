// Test harness for the browser tests: a real redis-server and the real agentrun-relay binary on
// free loopback ports, a tiny Redis client that publishes entries exactly the way the protocol
// crate does (it calls the protocol's own publish function, loaded from protocol/src/agentrun.lua),
// and headless Debian chromium driven by playwright-core.

import { spawn, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, existsSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

/**
 * Spawns a process that dies with this one (`setpriv --pdeathsig KILL` execs the command, so
 * the child is the command itself): a test runner killed mid-test leaves no redis-server,
 * relay or agent behind.
 */
export function spawnTied(command, args, options) {
  return spawn('setpriv', ['--pdeathsig', 'KILL', '--', command, ...args], options);
}

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, '../../../..');
export const ARTIFACTS = resolve(here, '../artifacts');

/** Resolves with `promise`, or with undefined after `ms` (and says so): for teardown steps. */
export function bounded(promise, ms, what) {
  let timer;
  const late = new Promise((res) => {
    timer = setTimeout(() => {
      console.error(`# ${what} did not finish within ${ms} ms; going on`);
      res(undefined);
    }, ms);
  });
  return Promise.race([Promise.resolve(promise).catch(() => undefined), late]).finally(() => clearTimeout(timer));
}

/** Polls `fn` until it returns a truthy value; throws with `what` after `ms`. */
export async function waitFor(what, fn, ms = 15000, every = 50) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      // A call that hangs (a stuck page, say) must not outlive the deadline either.
      let timer;
      const v = await Promise.race([
        fn(),
        new Promise((_, rej) => {
          timer = setTimeout(() => rej(new Error('a check did not answer')), Math.max(1000, deadline - Date.now()));
        }),
      ]).finally(() => clearTimeout(timer));
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.unref();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

function exited(child) {
  return new Promise((res) => {
    if (child.exitCode !== null || child.signalCode !== null) res();
    else child.once('exit', () => res());
  });
}

// ---------------------------------------------------------------------------------------------
// Redis

/** A minimal RESP2 client: enough for the tests' commands and one subscription. */
export class RedisClient {
  static async connect(port) {
    const sock = net.createConnection({ host: '127.0.0.1', port });
    await new Promise((res, rej) => {
      sock.once('connect', res);
      sock.once('error', rej);
    });
    return new RedisClient(sock);
  }

  constructor(sock) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.queue = [];
    this.onMessage = null;
    sock.on('data', (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.drain();
    });
    sock.on('error', () => {});
    sock.on('close', () => {
      for (const q of this.queue.splice(0)) q.reject(new Error('redis connection closed'));
    });
  }

  command(...args) {
    const parts = [`*${args.length}\r\n`];
    const bufs = [];
    for (const a of args) {
      const b = Buffer.isBuffer(a) ? a : Buffer.from(String(a));
      bufs.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n'));
    }
    return new Promise((resolve, reject) => {
      this.queue.push({ resolve, reject });
      this.sock.write(Buffer.concat([Buffer.from(parts[0]), ...bufs]));
    });
  }

  /** Subscribes to a channel; `onMessage(channel, payloadString)` gets every message. */
  async subscribe(channel, onMessage) {
    this.onMessage = onMessage;
    await this.command('SUBSCRIBE', channel);
  }

  drain() {
    for (;;) {
      const r = parseReply(this.buf, 0);
      if (!r) return;
      this.buf = this.buf.subarray(r.end);
      const v = r.value;
      if (this.onMessage && Array.isArray(v) && v[0] === 'message') {
        this.onMessage(v[1], v[2]);
        continue;
      }
      const q = this.queue.shift();
      if (!q) continue;
      if (v instanceof Error) q.reject(v);
      else q.resolve(v);
    }
  }

  close() {
    this.sock.destroy();
  }
}

function parseReply(buf, i) {
  if (i >= buf.length) return null;
  const nl = buf.indexOf('\r\n', i);
  if (nl < 0) return null;
  const type = String.fromCharCode(buf[i]);
  const line = buf.toString('utf8', i + 1, nl);
  const after = nl + 2;
  if (type === '+') return { value: line, end: after };
  if (type === '-') return { value: new Error(line), end: after };
  if (type === ':') return { value: Number(line), end: after };
  if (type === '$') {
    const n = Number(line);
    if (n < 0) return { value: null, end: after };
    if (buf.length < after + n + 2) return null;
    return { value: buf.toString('utf8', after, after + n), end: after + n + 2 };
  }
  if (type === '*') {
    const n = Number(line);
    if (n < 0) return { value: null, end: after };
    const out = [];
    let j = after;
    for (let k = 0; k < n; k++) {
      const r = parseReply(buf, j);
      if (!r) return null;
      out.push(r.value);
      j = r.end;
    }
    return { value: out, end: j };
  }
  throw new Error(`unexpected RESP type ${JSON.stringify(type)}`);
}

export class RedisServer {
  static async start() {
    const s = new RedisServer();
    s.port = await freePort();
    s.dir = mkdtempSync(join(tmpdir(), 'agentrun-ui-redis-'));
    s.child = spawnTied('redis-server', ['--port', String(s.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', s.dir], { stdio: 'ignore' });
    await waitFor('redis-server to answer PING', async () => {
      const c = await RedisClient.connect(s.port);
      try {
        return (await c.command('PING')) === 'PONG';
      } finally {
        c.close();
      }
    }, 20000, 100);
    return s;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  async stop() {
    this.child.kill('SIGKILL');
    await exited(this.child);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** agentrun's Redis function library, loaded as the operator loads it. */
const FUNCTIONS_LIBRARY = readFileSync(join(REPO, 'protocol/src/agentrun.lua'), 'utf8');

/** Publishes entries to one run the way agentrun_protocol::Publisher does. */
export class RunPublisher {
  constructor(redis, run, producer = 'ui-test') {
    this.redis = redis;
    this.run = run;
    this.producer = producer;
    this.pseq = new Map();
  }

  key(stream) {
    return `run:{${this.run}}:${stream}`;
  }

  async register(variations, extra = {}) {
    const now = Date.now();
    await this.redis.command('ZADD', 'agentrun:runs', 'NX', now, this.run);
    await this.redis.command('HSETNX', this.key('state'), 'created', now);
    await this.redis.command('HSET', this.key('state'), 'variations', variations.join(','), ...Object.entries(extra).flat());
  }

  async setState(fields) {
    await this.redis.command('HSET', this.key('state'), ...Object.entries(fields).flat());
  }

  /** stream: 'output:VAR', 'logs:VAR', 'status', 'metrics'; entries: [{type, content, meta?}] */
  async publish(stream, entries) {
    const p = this.pseq.get(stream) || 0;
    const args = [];
    entries.forEach((e, k) => {
      args.push(p + k + 1, Date.now(), e.type, e.content, e.meta ? JSON.stringify(e.meta) : '');
    });
    this.pseq.set(stream, p + entries.length);
    // KEYS: stream, producers hash, state hash; ARGV: producer, MAXLEN, publish command, a
    // fresh epoch to propose, the expected top (0: no check) and its epoch, then the entries.
    const epoch = randomBytes(8).toString('hex');
    const call = () => this.redis.command('FCALL', 'agentrun_v1_publish', 3, this.key(stream), this.key('producers'), this.key('state'), this.producer, 0, 'PUBLISH', epoch, 0, '', ...args);
    try {
      return await call();
    } catch (e) {
      if (!/Function not found/.test(String(e && e.message))) throw e;
      await this.redis.command('FUNCTION', 'LOAD', 'REPLACE', FUNCTIONS_LIBRARY);
      return call();
    }
  }

  output(variation, text) {
    return this.publish(`output:${variation}`, [{ type: 'output', content: text }]);
  }

  logs(variation, text) {
    return this.publish(`logs:${variation}`, [{ type: 'logs', content: text }]);
  }

  async status(variation, state, more = {}) {
    const ev = { variation, state, source: 'test', ...more };
    await this.setState({ [`var:${variation}`]: JSON.stringify(ev) });
    return this.publish('status', [{ type: 'status', content: JSON.stringify(ev) }]);
  }

  /** Marks every variation final and the run ended, so that the relay sends `end`. */
  async finish(variations, state = 'succeeded') {
    for (const v of variations) await this.status(v, state, { reason: 'Completed', exitCode: 0 });
    await this.setState({ phase: state, ended: Date.now() });
  }
}

// ---------------------------------------------------------------------------------------------
// Relay

export function binary(name) {
  const env = process.env[`AGENTRUN_${name.replace(/^agentrun-/, '').toUpperCase()}_BIN`];
  if (env) return env;
  const target = process.env.CARGO_TARGET_DIR || join(REPO, 'target');
  const p = join(target, 'debug', name);
  if (!existsSync(p)) throw new Error(`${p} does not exist: run \`cargo build -p ${name}\` first (scripts/test-browser.sh does)`);
  return p;
}

export class Relay {
  /**
   * `options.tls`: `{ cert, key }` PEM files: the relay serves HTTPS (HTTP/2 and HTTP/1.1).
   * `options.archive`: the archive store's URL (`--archive-url`): runs Redis has let go are
   * served from there. `options.env`: more environment (a cloud store's credentials).
   */
  static async start(redisUrl, port, options = {}) {
    const r = new Relay();
    r.redisUrl = redisUrl;
    r.port = port || (await freePort());
    r.tls = options.tls;
    r.archive = options.archive;
    r.env = options.env || {};
    await r.spawn();
    return r;
  }

  get url() {
    return this.tls ? `https://localhost:${this.port}` : `http://127.0.0.1:${this.port}`;
  }

  async spawn() {
    this.log = '';
    const args = ['--redis-url', this.redisUrl, '--listen', `127.0.0.1:${this.port}`];
    if (this.tls) args.push('--tls-cert', this.tls.cert, '--tls-key', this.tls.key);
    if (this.archive) args.push('--archive-url', this.archive);
    this.child = spawnTied(binary('agentrun-relay'), args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn', ...this.env },
    });
    const keep = (d) => {
      this.log = (this.log + d.toString()).slice(-20000);
    };
    this.child.stdout.on('data', keep);
    this.child.stderr.on('data', keep);
    await waitFor(`the relay on port ${this.port} to serve / (log: ${this.log})`, async () => {
      if (this.child.exitCode !== null) throw new Error(`relay exited: ${this.log}`);
      // Over TLS the test's certificate is not one Node trusts: the relay listens once it
      // is connected to Redis, so an accepted connection says it is ready.
      if (this.tls) return accepts(this.port);
      const res = await fetch(`${this.url}/`);
      return res.ok;
    }, 30000, 100);
  }

  async stop(signal = 'SIGTERM') {
    if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill(signal);
    const t = setTimeout(() => this.child.kill('SIGKILL'), 10000);
    await exited(this.child);
    clearTimeout(t);
  }

  async restart(signal = 'SIGTERM', downMs = 0) {
    await this.stop(signal);
    if (downMs) await new Promise((r) => setTimeout(r, downMs));
    await this.spawn();
  }
}

// ---------------------------------------------------------------------------------------------
// Archiver

/** `agentrun-archiver` archiving to a store (a folder here), as the chart runs it. */
export class Archiver {
  /** `env`: more environment (a cloud store's credentials, see [`S3Server`]). */
  static async start(redisUrl, storeUrl, env = {}) {
    const a = new Archiver();
    a.log = '';
    const metrics = await freePort();
    a.child = spawnTied(binary('agentrun-archiver'), ['--redis-url', redisUrl, '--store-url', storeUrl, '--metrics-addr', `127.0.0.1:${metrics}`, '--consumer', `ui-test-${process.pid}`], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn', ...env },
    });
    const keep = (d) => {
      a.log = (a.log + d.toString()).slice(-20000);
    };
    a.child.stdout.on('data', keep);
    a.child.stderr.on('data', keep);
    return a;
  }

  /**
   * Puts a finished run on the archive queue, as the operator does when a run ends; Redis
   * drops the run's keys `retentionSeconds` after its archive is complete.
   */
  static async enqueue(redis, run, retentionSeconds) {
    await redis.command('HSET', `run:{${run}}:state`, 'archive', 'queued');
    await redis.command('XADD', 'agentrun:{archive}:queue', '*', 'run', run, 'retention', String(retentionSeconds), 'source', 'ui-test', 'enqueued', String(Date.now()));
  }

  async stop() {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGKILL');
    await exited(this.child);
  }
}

/**
 * A real S3 API on loopback: `s3s-fs` (crates.io; scripts/deps/s3s-fs.sh installs it) with a
 * bucket, for archive stores given as `s3://` URLs.
 */
export class S3Server {
  static async start() {
    const bin = [join(process.env.HOME || '', '.cargo/bin/s3s-fs'), '/usr/local/bin/s3s-fs', '/usr/local/cargo/bin/s3s-fs'].find((p) => existsSync(p));
    if (!bin) throw new Error('s3s-fs is not installed: run scripts/deps/s3s-fs.sh (cargo install s3s-fs --features binary)');
    const s = new S3Server();
    s.port = await freePort();
    s.dir = mkdtempSync(join(tmpdir(), 'agentrun-ui-s3-'));
    mkdirSync(join(s.dir, 'archive'));
    s.child = spawnTied(bin, ['--host', '127.0.0.1', '--port', String(s.port), '--access-key', 'agentrun-test', '--secret-key', 'agentrun-test-secret', s.dir], { stdio: 'ignore' });
    await waitFor(`s3s-fs to listen on ${s.port}`, () => accepts(s.port), 20000, 100);
    return s;
  }

  /** The store URL (`--store-url`, `--archive-url`). */
  get url() {
    return 's3://archive/prefix';
  }

  /** The environment the archiver and the relay need to reach it. */
  get env() {
    return {
      AWS_ACCESS_KEY_ID: 'agentrun-test',
      AWS_SECRET_ACCESS_KEY: 'agentrun-test-secret',
      AWS_REGION: 'us-east-1',
      AWS_ENDPOINT_URL: `http://127.0.0.1:${this.port}`,
      AWS_ALLOW_HTTP: 'true',
    };
  }

  async stop() {
    this.child.kill('SIGKILL');
    await exited(this.child);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
/** Whether something accepts TCP connections on 127.0.0.1:port. */
function accepts(port) {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    sock.once('connect', () => {
      sock.destroy();
      resolve(true);
    });
    sock.once('error', () => resolve(false));
  });
}

/** A self-signed certificate for `localhost` (openssl), in a temporary folder. */
export function localhostCertificate() {
  const dir = mkdtempSync(join(tmpdir(), 'agentrun-ui-tls-'));
  const cert = join(dir, 'tls.crt');
  const key = join(dir, 'tls.key');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost'], { stdio: 'ignore' });
  return { dir, cert, key, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

// Browser

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/**
 * Launches headless chromium (playwright gives it a fresh temporary profile, --user-data-dir).
 * Tracks dialogs, page errors, crashes and CSP reports so that tests can assert that hostile
 * output opened no dialog and ran nothing.
 */
export async function launchBrowser(contextOptions = {}) {
  // A browser server, so that teardown can kill the chromium process if closing hangs.
  const server = await chromium.launchServer({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 60000,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const browser = await chromium.connect(server.wsEndpoint(), { timeout: 60000 });
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, ...contextOptions });
  context.setDefaultTimeout(30000);
  const dialogs = [];
  const errors = [];
  const cspViolations = [];
  const watch = (page) => {
    page.on('dialog', (d) => {
      dialogs.push(`${d.type()}: ${d.message()}`);
      d.dismiss().catch(() => {});
    });
    page.on('pageerror', (e) => errors.push(String(e)));
    page.on('crash', () => errors.push('the page crashed'));
    page.on('console', (m) => {
      if (m.type() === 'error' && /Content Security Policy/i.test(m.text())) cspViolations.push(m.text());
    });
  };
  context.on('page', watch);
  const page = await context.newPage();
  return {
    browser,
    context,
    page,
    dialogs,
    errors,
    cspViolations,
    async screenshot(name) {
      mkdirSync(ARTIFACTS, { recursive: true });
      const path = join(ARTIFACTS, `${name}.png`);
      await page.screenshot({ path, fullPage: false });
      return path;
    },
    async close() {
      await bounded(browser.close(), 15000, 'closing the browser connection');
      await bounded(server.close(), 15000, 'closing chromium');
      await bounded(server.kill(), 15000, 'killing chromium');
    },
  };
}

/** The output text shown for a variation (plain view). */
export function outputText(page, variation) {
  return page.evaluate((v) => {
    const col = document.querySelector(`section.variation[data-variation="${v}"] pre.term`);
    return col ? col.textContent : null;
  }, variation);
}

let runCounter = 0;
export function uniqueRun(prefix) {
  runCounter++;
  return `${prefix}-${process.pid}-${runCounter}-${Date.now().toString(36)}`;
}

/** Redis, the relay, a Redis client and a browser, for one test file. */
export async function startStack() {
  const redis = await RedisServer.start();
  const client = await RedisClient.connect(redis.port);
  const relay = await Relay.start(redis.url);
  const browser = await launchBrowser();
  return {
    redis,
    client,
    relay,
    browser,
    page: browser.page,
    publisher: (run) => new RunPublisher(client, run),
    async close() {
      await browser.close();
      await bounded(relay.stop('SIGKILL'), 15000, 'stopping the relay');
      client.close();
      await bounded(redis.stop(), 15000, 'stopping redis');
    },
  };
}

/** A TCP proxy in front of the relay whose connections can be cut, as a network failure would. */
export class TcpProxy {
  static async start(targetPort) {
    const p = new TcpProxy();
    p.targetPort = targetPort;
    p.sockets = new Set();
    p.badGateway = false;
    p.server = net.createServer((client) => {
      if (p.badGateway) {
        // Answer like a proxy whose backend is gone: EventSource gives up on an HTTP error.
        client.on('error', () => {});
        client.end('HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad gateway\n');
        return;
      }
      const upstream = net.createConnection({ host: '127.0.0.1', port: p.targetPort });
      p.sockets.add(client);
      p.sockets.add(upstream);
      const done = () => {
        client.destroy();
        upstream.destroy();
        p.sockets.delete(client);
        p.sockets.delete(upstream);
      };
      client.on('error', done).on('close', done);
      upstream.on('error', done).on('close', done);
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise((r) => p.server.listen(0, '127.0.0.1', r));
    p.port = p.server.address().port;
    return p;
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Resets every open connection (both directions). */
  cut() {
    const n = this.sockets.size;
    for (const s of this.sockets) s.resetAndDestroy ? s.resetAndDestroy() : s.destroy();
    this.sockets.clear();
    return n / 2;
  }

  async close() {
    this.badGateway = false;
    this.server.close();
    this.cut();
  }
}
