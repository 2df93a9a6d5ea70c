// A real browser in a call: headless Chromium (Debian's `chromium`, driven by playwright-core)
// with fake camera and microphone, one page per token, each joining the same room through the
// server's WebSocket signalling and its SFU. Used by the Rust integration tests.
//
//   node tests/browser/call.mjs --ws ws://127.0.0.1:PORT/v1/ws --room ROOM \
//        --token TOKEN_A --token TOKEN_B [--timeout 40] [--chromium /usr/bin/chromium]
//
// Passes when, on every page, inbound video `framesDecoded` grew between two samples at least
// 1 s apart (both non-zero) and inbound audio packets arrived. Output: one JSON line on stdout,
//   {"ok": true, "pages": [{"framesDecoded": [a, b], "audioPackets": n}, ...]}   exit 0
//   {"ok": false, "error": "...", "pages": [{...stats, console, ws frames...}]}   exit 1
// Progress goes to stderr. The browser is closed in every case.
import { chromium } from 'playwright-core';
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const t0 = Date.now();
const note = (...args) => console.error(`[call.mjs +${Date.now() - t0}ms]`, ...args);

function parseArgs(argv) {
  const a = { tokens: [], timeout: 40, chromium: process.env.CHROMIUM || '/usr/bin/chromium' };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = argv[i + 1];
    if (v === undefined) throw new Error(`${k} needs a value`);
    i++;
    if (k === '--ws') a.ws = v;
    else if (k === '--room') a.room = v;
    else if (k === '--token') a.tokens.push(v);
    else if (k === '--timeout') a.timeout = Number(v);
    else if (k === '--chromium') a.chromium = v;
    else throw new Error(`unknown argument ${k}`);
  }
  if (!a.ws || !a.room || a.tokens.length === 0) throw new Error('need --ws, --room and at least one --token');
  if (!(a.timeout > 0)) throw new Error('--timeout must be a positive number of seconds');
  return a;
}

let printed = false;
function finish(report, code) {
  if (!printed) {
    printed = true;
    process.stdout.write(`${JSON.stringify(report)}\n`);
  }
  process.exitCode = code;
}

// Serves call.html on 127.0.0.1 (a secure context: getUserMedia works there).
async function servePage() {
  const html = await readFile(fileURLToPath(new URL('./call.html', import.meta.url)));
  const server = createServer((req, res) => {
    if (req.url === '/' || req.url.startsWith('/call.html')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(html);
    } else if (req.url === '/favicon.ico') {
      res.writeHead(204).end(); // no 404 noise in the page console
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return { server, url: `http://127.0.0.1:${server.address().port}/call.html` };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const deadline = t0 + args.timeout * 1000;
  // If closing the browser itself hangs, still exit (with whatever was printed, or a failure).
  setTimeout(() => {
    note('hard deadline: exiting');
    finish({ ok: false, error: 'hard deadline (the browser did not close in time)' }, 1);
    process.exit(process.exitCode);
  }, args.timeout * 1000 + 20_000).unref();

  const { server, url } = await servePage();
  note('page at', url);
  let browser = null;
  const pages = args.tokens.map((token, index) => ({
    index, token, page: null, console: [], pageErrors: [], samples: [], last: null, diag: null,
  }));
  try {
    browser = await chromium.launch({
      executablePath: args.chromium,
      headless: true,
      args: [
        '--use-fake-device-for-media-stream',
        '--use-fake-ui-for-media-stream',
        '--allow-loopback-in-peer-connection',
        '--no-sandbox',
      ],
      timeout: 30_000,
    });
    note('chromium', browser.version());

    for (const p of pages) {
      const context = await browser.newContext();
      await context.grantPermissions(['camera', 'microphone'], { origin: new URL(url).origin });
      p.page = await context.newPage();
      p.page.on('console', (m) => {
        p.console.push(`${m.type()}: ${m.text()}`);
        if (p.console.length > 300) p.console.splice(20, 1);
      });
      p.page.on('pageerror', (e) => p.pageErrors.push(String(e && e.stack || e)));
      p.page.on('crash', () => p.pageErrors.push('page crashed'));
      await p.page.goto(url);
    }

    // Join one after the other: the first is in the room before the second arrives, so the
    // first gets its remote media through a server offer and the second with its join.
    for (const p of pages) {
      note(`page ${p.index}: joining ${args.room}`);
      await p.page.evaluate(([ws, room, token]) => window.vibeCall.start(ws, room, token), [args.ws, args.room, p.token]);
      for (;;) {
        const s = await p.page.evaluate(() => window.vibeCall.stats());
        p.last = s;
        if (s.fatal) throw new Error(`page ${p.index}: ${s.fatal}`);
        if (s.joined) {
          note(`page ${p.index}: joined as ${s.participant}`);
          break;
        }
        if (Date.now() > deadline) throw new Error(`page ${p.index}: not joined before the timeout`);
        await sleep(100);
      }
    }

    // Poll until media flows everywhere.
    let lastNote = 0;
    for (;;) {
      const now = Date.now();
      for (const p of pages) {
        const s = await p.page.evaluate(() => window.vibeCall.stats());
        p.last = s;
        if (s.fatal) throw new Error(`page ${p.index}: ${s.fatal}`);
        p.samples.push({ at: Date.now(), frames: s.framesDecoded, audio: s.audioPackets });
        if (p.samples.length > 200) p.samples.shift();
      }
      // A page passes when its newest sample has more decoded frames than the newest sample
      // taken at least 1 s earlier, that one already non-zero, and audio packets arrived.
      const verdicts = pages.map((p) => {
        const b = p.samples[p.samples.length - 1];
        const a = p.samples.filter((x) => b.at - x.at >= 1000).pop();
        const ok = !!a && a.frames > 0 && b.frames > a.frames && b.audio > 0;
        return { ok, framesDecoded: a ? [a.frames, b.frames] : [b.frames], audioPackets: b.audio };
      });
      if (verdicts.every((v) => v.ok)) {
        note('media flows on every page', JSON.stringify(verdicts));
        finish({ ok: true, pages: verdicts.map(({ framesDecoded, audioPackets }) => ({ framesDecoded, audioPackets })) }, 0);
        return;
      }
      if (now - lastNote >= 2000) {
        lastNote = now;
        note(pages.map((p) => `page ${p.index}: ${p.last.connectionState}/${p.last.iceConnectionState} frames ${p.last.framesDecoded} audio ${p.last.audioPackets}`).join('; '));
      }
      if (Date.now() > deadline) throw new Error('timeout: media did not flow on every page');
      await sleep(250);
    }
  } catch (e) {
    const error = String(e && e.message || e);
    note('FAILED', error);
    for (const p of pages) {
      if (!p.page) continue;
      try {
        p.last = await p.page.evaluate(() => window.vibeCall.stats());
      } catch { /* the page may be gone */ }
      try {
        p.diag = await p.page.evaluate(() => window.vibeCall.diag());
      } catch (err) {
        p.diag = { unavailable: String(err && err.message || err) };
      }
    }
    finish({
      ok: false,
      error,
      pages: pages.map((p) => ({
        index: p.index,
        stats: p.last,
        samples: p.samples.slice(-8).map((s) => ({ t: s.at - t0, frames: s.frames, audio: s.audio })),
        pageErrors: p.pageErrors,
        console: p.console,
        ...(p.diag || {}),
      })),
    }, 1);
  } finally {
    if (browser) await browser.close().catch((e) => note('closing the browser:', String(e)));
    server.close();
    server.closeAllConnections?.();
  }
}

main().catch((e) => {
  note('FAILED', e && e.stack || e);
  finish({ ok: false, error: String(e && e.message || e) }, 1);
});
