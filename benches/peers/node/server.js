'use strict';
// A hand-rolled realtime backend, the way many teams build one: Node.js, `ws`, `pg`, and a
// per-row trigger that NOTIFYs the inserted row, with one LISTEN connection fanning the
// notifications out to WebSocket subscribers. It speaks just enough of Vibe's protocol for
// benches/feed_latency.rs to drive it unchanged (see README.md beside this file):
//
//   GET  /health                 -> 200
//   POST /v1/docs/:type          -> INSERT one row; 201 with the document JSON
//   WS   /v1/ws (vibe.v1)        -> {"op":"read","type":T,"global":true,...} subscribes the socket
//                                   to every new document of type T; {"op":"unsub"}; {"op":"ping"}
//
// Deliberately missing: authentication (tokens are accepted and never verified), ACLs (every
// subscriber of a type gets every new document of it: a global, public feed), resume (`since`),
// initial snapshots (`docs` is always []), updates/deletes (the only `remove` events are of
// documents leaving a window), and reconnection of the LISTEN
// connection (if it drops the process exits).
//
// Config (environment): DATABASE_URL (required, a postgres:// URL), PORT (default 0 = any free
// port), POOL_SIZE (writer connections, default 10). Binds 127.0.0.1 only and prints
// `listening on http://127.0.0.1:<port>` on stdout when ready.

const http = require('node:http');
const { Pool, Client } = require('pg');
const { WebSocketServer } = require('ws');

const HOST = '127.0.0.1';
const CHANNEL = 'node_docs';
const WS_PATH = '/v1/ws';
const SUBPROTOCOL = 'vibe.v1';
// Every document gets this owner. Tokens are NOT verified (nor even parsed): the Authorization
// header and the token offered as the second WebSocket subprotocol are accepted as they come.
const OWNER_DID = 'did:key:zNodePeer';
const MAX_BODY_BYTES = 1024 * 1024;
const TYPE_RE = /^[A-Za-z0-9_.-]{1,64}$/;

const databaseUrl = process.env.DATABASE_URL;
if (!databaseUrl) {
  console.error('error: set DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/mydb)');
  process.exit(2);
}
const port = Number.parseInt(process.env.PORT ?? '0', 10);
const poolSize = Number.parseInt(process.env.POOL_SIZE ?? '10', 10);
if (!Number.isInteger(port) || port < 0 || port > 65535 || !(poolSize > 0)) {
  console.error('error: PORT must be 0..65535 and POOL_SIZE a positive integer');
  process.exit(2);
}

// Sessions in UTC, so the trigger's row_to_json writes timestamps as `...+00:00` (turned into
// `...Z` below), the same text in the notification and in the POST answer.
const pgOptions = { connectionString: databaseUrl, options: '-c TimeZone=UTC' };
const pool = new Pool({ ...pgOptions, max: poolSize });
pool.on('error', (e) => console.error(`pool connection error: ${e.message}`));

// The table and the trigger. `pg_notify` runs in the writer's transaction and the notification
// is delivered at its commit. Its payload is limited to 8000 bytes: a row whose JSON is longer
// makes pg_notify (and so the INSERT) fail. The bench's rows are about 300 bytes; a real system
// would NOTIFY only the id and read the row back.
const SCHEMA_SQL = `
CREATE TABLE IF NOT EXISTS node_docs (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  owner text,
  type text,
  acl jsonb,
  data jsonb,
  rev bigint DEFAULT 1,
  created_at timestamptz DEFAULT now(),
  updated_at timestamptz DEFAULT now()
);
CREATE OR REPLACE FUNCTION node_docs_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
  PERFORM pg_notify('${CHANNEL}', row_to_json(NEW)::text);
  RETURN NULL;
END
$fn$;
DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgname = 'node_docs_notify' AND tgrelid = 'node_docs'::regclass) THEN
    CREATE TRIGGER node_docs_notify AFTER INSERT ON node_docs
      FOR EACH ROW EXECUTE FUNCTION node_docs_notify();
  END IF;
END
$do$;
`;

async function ensureSchema() {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    // Two servers starting at once on one database must not race on the DDL.
    await client.query("SELECT pg_advisory_xact_lock(hashtext('node_docs schema'))");
    await client.query(SCHEMA_SQL);
    await client.query('COMMIT');
  } catch (e) {
    await client.query('ROLLBACK').catch(() => {});
    throw e;
  } finally {
    client.release();
  }
}

// `row_to_json` of a node_docs row (snake_case, from the trigger or from RETURNING) -> the
// document as the API shows it (camelCase).
function utc(ts) {
  return typeof ts === 'string' && ts.endsWith('+00:00') ? ts.slice(0, -6) + 'Z' : ts;
}
function toDoc(row) {
  return {
    id: row.id,
    type: row.type,
    owner: row.owner,
    rev: row.rev,
    createdAt: utc(row.created_at),
    updatedAt: utc(row.updated_at),
    acl: row.acl,
    data: row.data,
  };
}

// --- subscriptions -----------------------------------------------------------------------------

// type -> { sub: 'qN', sockets: Map<WebSocket, limit>, recent: [id, ...] }. One "live query"
// per type, shared by every socket subscribed to it, so one event frame serves them all. Each
// socket has the window its `limit` asks for, as in Vibe: once it holds `limit` documents, each
// new one pushes the oldest out and the socket also gets a `remove` for it. `recent` keeps the
// newest ids, newest first, enough to know what leaves any window.
const feeds = new Map();
const DEFAULT_LIMIT = 100;
const MAX_LIMIT = 1000;
// sub id -> type
const feedsBySub = new Map();
let nextSub = 1;
// Event cursors: a per-process counter. Opaque and not resumable (there is no `since`).
let seq = 0;

function subscribe(ws, type, limit) {
  let feed = feeds.get(type);
  if (!feed) {
    feed = { sub: `q${nextSub++}`, sockets: new Map(), recent: [] };
    feeds.set(type, feed);
    feedsBySub.set(feed.sub, type);
  }
  feed.sockets.set(ws, limit);
  ws.subs.add(feed.sub);
  return feed.sub;
}

function unsubscribe(ws, sub) {
  const type = feedsBySub.get(sub);
  const feed = type === undefined ? undefined : feeds.get(type);
  if (feed) {
    feed.sockets.delete(ws);
  }
  ws.subs.delete(sub);
}

function onNotification(msg) {
  if (msg.channel !== CHANNEL) {
    return;
  }
  let row;
  try {
    row = JSON.parse(msg.payload);
  } catch (e) {
    console.error(`unreadable notification payload: ${e.message}`);
    return;
  }
  const feed = feeds.get(row.type);
  seq += 1;
  if (!feed) {
    return;
  }
  feed.recent.unshift(row.id);
  if (feed.recent.length > MAX_LIMIT + 1) {
    feed.recent.pop();
  }
  if (feed.sockets.size === 0) {
    return;
  }
  // Built and encoded once per notification; every subscriber gets the same bytes. No ACL check:
  // this is a global, public feed.
  const frame = Buffer.from(
    JSON.stringify({ sub: feed.sub, event: 'add', cursor: `${seq}-0`, doc: toDoc(row) }),
  );
  // Encoded once per window size (one in the benchmarks).
  const removes = new Map();
  for (const [ws, limit] of feed.sockets) {
    // No backpressure: a slow socket buffers in memory (ws.bufferedAmount) without limit.
    ws.send(frame, { binary: false });
    const left = feed.recent[limit];
    if (left !== undefined) {
      let remove = removes.get(limit);
      if (!remove) {
        remove = Buffer.from(
          JSON.stringify({ sub: feed.sub, event: 'remove', cursor: `${seq}-1`, id: left }),
        );
        removes.set(limit, remove);
      }
      ws.send(remove, { binary: false });
    }
  }
}

// --- HTTP ----------------------------------------------------------------------------------------

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
  });
  res.end(text);
}

function fail(res, status, code, message) {
  send(res, status, { error: { code, message } });
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

async function createDoc(req, res, type) {
  let body;
  try {
    body = JSON.parse((await readBody(req)).toString('utf8'));
  } catch (e) {
    fail(res, e.status ?? 400, 'bad_request', e.status ? e.message : `invalid JSON: ${e.message}`);
    return;
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body) || !('data' in body)) {
    fail(res, 400, 'bad_request', 'the body must be {"data": ..., "acl"?: {...}}');
    return;
  }
  const unknown = Object.keys(body).filter((k) => k !== 'data' && k !== 'acl');
  if (unknown.length > 0) {
    fail(res, 400, 'bad_request', `unknown fields: ${unknown.join(', ')}`);
    return;
  }
  const acl = body.acl ?? {};
  if (acl === null || typeof acl !== 'object' || Array.isArray(acl)) {
    fail(res, 400, 'bad_request', '`acl` must be an object');
    return;
  }
  try {
    // The ACL is stored as given and never enforced. The trigger NOTIFYs the row in this
    // transaction; pg sends it to the LISTEN connection when the INSERT commits.
    const { rows } = await pool.query(
      'INSERT INTO node_docs (owner, type, acl, data) VALUES ($1, $2, $3, $4) ' +
        'RETURNING row_to_json(node_docs.*) AS doc',
      [OWNER_DID, type, JSON.stringify(acl), JSON.stringify(body.data)],
    );
    send(res, 201, toDoc(rows[0].doc));
  } catch (e) {
    if (e.code === '22023' && /payload string too long/.test(e.message)) {
      // The row's JSON exceeds NOTIFY's 8000-byte payload limit: the trigger failed the INSERT.
      fail(res, 413, 'too_large', 'the document is too large for a NOTIFY payload (8000 bytes)');
      return;
    }
    console.error(`insert failed: ${e.message}`);
    fail(res, 503, 'unavailable', e.message);
  }
}

function onRequest(req, res) {
  const path = req.url.split('?', 1)[0];
  if (path === '/health') {
    if (req.method === 'GET' || req.method === 'HEAD') {
      send(res, 200, { status: 'ok' });
    } else {
      fail(res, 405, 'method_not_allowed', 'GET /health');
    }
    return;
  }
  const m = /^\/v1\/docs\/([^/]+)$/.exec(path);
  if (m) {
    let type;
    try {
      type = decodeURIComponent(m[1]);
    } catch {
      type = '';
    }
    if (!TYPE_RE.test(type)) {
      fail(res, 400, 'bad_request', 'the type must match [A-Za-z0-9_.-]{1,64}');
    } else if (req.method !== 'POST') {
      fail(res, 405, 'method_not_allowed', 'only POST /v1/docs/:type is implemented');
    } else {
      createDoc(req, res, type).catch((e) => {
        console.error(`request failed: ${e.stack}`);
        if (!res.headersSent) fail(res, 500, 'internal', 'internal error');
      });
    }
    return;
  }
  fail(res, 404, 'not_found', `no route for ${req.method} ${path}`);
}

// --- WebSocket -----------------------------------------------------------------------------------

const wss = new WebSocketServer({
  noServer: true,
  // Pick vibe.v1; the other offered value (the token) is ignored, never verified.
  handleProtocols: (protocols) => (protocols.has(SUBPROTOCOL) ? SUBPROTOCOL : false),
  maxPayload: 64 * 1024,
  perMessageDeflate: false,
});

function reply(ws, body) {
  ws.send(JSON.stringify(body));
}

function replyError(ws, re, code, message) {
  reply(ws, { re, error: { code, message } });
}

function onMessage(ws, data, isBinary) {
  let msg;
  try {
    msg = JSON.parse(isBinary ? Buffer.from(data).toString('utf8') : data.toString('utf8'));
  } catch (e) {
    replyError(ws, null, 'bad_request', `invalid JSON: ${e.message}`);
    return;
  }
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
    replyError(ws, null, 'bad_request', 'a request is a JSON object');
    return;
  }
  const re = msg.id ?? null;
  switch (msg.op) {
    case 'read': {
      if (typeof msg.type !== 'string' || !TYPE_RE.test(msg.type)) {
        replyError(ws, re, 'bad_request', '`type` must match [A-Za-z0-9_.-]{1,64}');
      } else if (msg.global !== true) {
        replyError(ws, re, 'unsupported', 'this peer only serves global feeds ("global": true)');
      } else if (msg.since !== undefined) {
        replyError(ws, re, 'unsupported', 'this peer cannot resume (`since`)');
      } else {
        // Registered before the reply is queued; Node runs this to the end before any
        // notification is handled, so the reply always comes before the first event.
        // No snapshot (`docs` is always []); `limit` sizes the socket's window (see feeds).
        const limit = Number.isInteger(msg.limit)
          ? Math.min(Math.max(msg.limit, 1), MAX_LIMIT)
          : DEFAULT_LIMIT;
        const sub = subscribe(ws, msg.type, limit);
        reply(ws, { re, ok: true, sub, docs: [], cursor: '0-0' });
      }
      break;
    }
    case 'unsub':
      if (typeof msg.sub !== 'string') {
        replyError(ws, re, 'bad_request', '`sub` must be a string');
      } else {
        unsubscribe(ws, msg.sub);
        reply(ws, { re, ok: true });
      }
      break;
    case 'ping':
      reply(ws, { re, ok: true, pong: true });
      break;
    default:
      replyError(ws, re, 'unknown_op', `unknown op ${JSON.stringify(msg.op)}: read, unsub, ping`);
  }
}

wss.on('connection', (ws) => {
  ws.subs = new Set();
  ws.on('message', (data, isBinary) => onMessage(ws, data, isBinary));
  ws.on('close', () => {
    for (const sub of ws.subs) unsubscribe(ws, sub);
  });
  ws.on('error', (e) => console.error(`websocket error: ${e.message}`));
});

function onUpgrade(req, socket, head) {
  const path = req.url.split('?', 1)[0];
  const offered = (req.headers['sec-websocket-protocol'] ?? '').split(',').map((p) => p.trim());
  let refusal = null;
  if (path !== WS_PATH) {
    refusal = '404 Not Found';
  } else if (!offered.includes(SUBPROTOCOL)) {
    refusal = '400 Bad Request';
  }
  if (refusal) {
    socket.end(`HTTP/1.1 ${refusal}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n`);
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
}

// --- start and stop ------------------------------------------------------------------------------

let stopping = false;

async function main() {
  await ensureSchema();

  // One LISTEN connection for the whole process. If it drops, notifications are lost with no
  // way to catch up (no resume): exit, so the failure is seen rather than a silently dead feed.
  const listener = new Client(pgOptions);
  listener.on('notification', onNotification);
  listener.on('error', (e) => {
    console.error(`LISTEN connection failed: ${e.message}`);
    process.exit(1);
  });
  listener.on('end', () => {
    if (!stopping) {
      console.error('LISTEN connection closed');
      process.exit(1);
    }
  });
  await listener.connect();
  await listener.query(`LISTEN ${CHANNEL}`);

  const server = http.createServer({ noDelay: true, keepAliveTimeout: 65_000 }, onRequest);
  server.on('upgrade', onUpgrade);
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, HOST, resolve);
  });
  console.log(`listening on http://${HOST}:${server.address().port}`);

  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    console.error(`${signal}: stopping`);
    for (const ws of wss.clients) ws.terminate();
    server.close();
    server.closeAllConnections();
    Promise.allSettled([listener.end(), pool.end()]).then(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

main().catch((e) => {
  console.error(`error: ${e.stack ?? e}`);
  process.exit(1);
});
