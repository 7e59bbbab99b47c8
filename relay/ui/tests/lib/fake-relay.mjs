// A scripted stand-in for the relay's HTTP API, serving the UI files from disk with the same
// Content-Security-Policy. Used only where a test needs the server to misbehave in ways the real
// relay must not (send duplicates, skip sequence numbers), to check the page's own defences.

import http from 'node:http';
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const UI = join(dirname(fileURLToPath(import.meta.url)), '../..');
const CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";
const TYPES = { js: 'text/javascript', css: 'text/css', svg: 'image/svg+xml', html: 'text/html' };

export class FakeRelay {
  constructor() {
    this.runs = {}; // run -> state object
    this.clients = new Set();
    this.connections = 0;
    this.lastEventIds = [];
    this.server = http.createServer((req, res) => this.handle(req, res));
  }

  async listen() {
    await new Promise((r) => this.server.listen(0, '127.0.0.1', r));
    this.url = `http://127.0.0.1:${this.server.address().port}`;
    return this;
  }

  handle(req, res) {
    const url = new URL(req.url, 'http://x');
    const p = url.pathname;
    if (p === '/' || /^\/runs\/[^/]+$/.test(p) || p.startsWith('/ui/')) {
      const file = p.startsWith('/ui/') ? p.slice(4) : 'index.html';
      try {
        const body = readFileSync(join(UI, file.replace(/[^a-z.]/g, '')));
        res.writeHead(200, { 'content-type': TYPES[file.split('.').pop()] || 'application/octet-stream', 'content-security-policy': CSP });
        res.end(body);
      } catch {
        res.writeHead(404).end();
      }
      return;
    }
    let m;
    if (p === '/api/runs') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(Object.entries(this.runs).map(([run, state]) => ({ run, state }))));
    } else if ((m = /^\/api\/runs\/([^/]+)$/.exec(p))) {
      const st = this.runs[decodeURIComponent(m[1])];
      res.writeHead(st ? 200 : 404, { 'content-type': 'application/json' });
      res.end(JSON.stringify(st ? { run: m[1], state: st } : { error: 'not found' }));
    } else if (/^\/api\/runs\/[^/]+\/events$/.test(p)) {
      this.connections++;
      this.lastEventIds.push(req.headers['last-event-id'] || url.searchParams.get('from') || '');
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      res.write('retry: 300\n\n');
      this.clients.add(res);
      req.on('close', () => this.clients.delete(res));
    } else {
      res.writeHead(404).end();
    }
  }

  /** Sends one SSE event to every connected client. */
  send(event, id, data) {
    const frame = `id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
    for (const c of this.clients) c.write(frame);
  }

  /** Drops every open stream (as a network failure would). */
  dropAll() {
    for (const c of this.clients) c.destroy();
    this.clients.clear();
  }

  async close() {
    this.dropAll();
    const closed = new Promise((r) => this.server.close(r));
    this.server.closeAllConnections();
    await closed;
  }
}
