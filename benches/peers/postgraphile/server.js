'use strict';
// PostGraphile v4 with @graphile/pg-pubsub subscriptions, set up the way its documentation
// describes, as a peer for the fan-out benchmarks (benches/fanout.sh; see README.md beside this
// file):
//
//   GET  /health                 -> 200
//   POST /v1/docs/:type          -> INSERT one row into pgl_docs with `pg` (not through GraphQL:
//                                   the fan-out is what is measured); 201 with the document JSON
//   WS   /graphql                -> GraphQL subscriptions (graphql-ws, subprotocol
//                                   graphql-transport-ws; the legacy subscriptions-transport-ws too):
//                                   subscription { listen(topic: "pgl_docs") { relatedNode { ... } } }
//   POST /graphql                -> PostGraphile's GraphQL endpoint
//
// An AFTER INSERT trigger calls pg_notify('postgraphile:pgl_docs', {"__node__": [...]}) inside the
// writer's transaction (the documented pattern); pg-pubsub LISTENs on one connection and, per
// notification, every subscription resolves `relatedNode` with its own query of the row.
//
// Config (environment): DATABASE_URL (required, a postgres:// URL), PORT (default 0 = any free
// port), POOL_SIZE (writer connections, default 10). Binds 127.0.0.1 only and prints
// `listening on http://127.0.0.1:<port>` on stdout when ready.

const { EventEmitter } = require('node:events');
const http = require('node:http');
const { Pool } = require('pg');
const { postgraphile, makePluginHook, enhanceHttpServerWithWebSockets } = require('postgraphile');
const { default: PgPubsub } = require('@graphile/pg-pubsub');

const HOST = '127.0.0.1';
const TOPIC = 'pgl_docs';
const OWNER_DID = 'did:key:zPostGraphilePeer';
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

// pg-pubsub adds one listener per subscription to its topic emitter: thousands, by design.
EventEmitter.defaultMaxListeners = 0;

const pgOptions = { connectionString: databaseUrl, options: '-c TimeZone=UTC' };
const pool = new Pool({ ...pgOptions, max: poolSize });
pool.on('error', (e) => console.error(`pool connection error: ${e.message}`));

// `__node__` names the row by its GraphQL node identity ("PglDoc", then the primary key), so
// pg-pubsub can hand each subscription the row as `relatedNode`.
const SCHEMA_SQL = `
CREATE TABLE IF NOT EXISTS pgl_docs (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  type text NOT NULL,
  owner text NOT NULL,
  rev integer NOT NULL DEFAULT 1,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  acl jsonb NOT NULL DEFAULT '{}',
  data jsonb NOT NULL DEFAULT '{}'
);
CREATE OR REPLACE FUNCTION pgl_docs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('postgraphile:${TOPIC}',
                    json_build_object('__node__', json_build_array('pgl_docs', NEW.id))::text);
  RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS pgl_docs_notify ON pgl_docs;
CREATE TRIGGER pgl_docs_notify AFTER INSERT ON pgl_docs FOR EACH ROW EXECUTE FUNCTION pgl_docs_notify();
`;

async function ensureSchema() {
  const client = await pool.connect();
  try {
    // Several peers may start on one database: one of them at a time.
    await client.query('SELECT pg_advisory_lock(4242)');
    try {
      await client.query(SCHEMA_SQL);
    } finally {
      await client.query('SELECT pg_advisory_unlock(4242)');
    }
  } finally {
    client.release();
  }
}

function utc(ts) {
  return new Date(ts).toISOString();
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('body too large'));
        req.destroy();
      } else {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

async function createDoc(req, res, type) {
  let body;
  try {
    body = JSON.parse(await readBody(req));
  } catch (e) {
    send(res, 400, { error: { code: 'bad_json', message: e.message } });
    return;
  }
  try {
    const { rows } = await pool.query(
      'INSERT INTO pgl_docs (type, owner, acl, data) VALUES ($1, $2, $3, $4) RETURNING *',
      [type, OWNER_DID, JSON.stringify(body.acl ?? {}), JSON.stringify(body.data ?? {})],
    );
    const row = rows[0];
    send(res, 201, {
      id: row.id, type: row.type, owner: row.owner, rev: row.rev,
      createdAt: utc(row.created_at), updatedAt: utc(row.updated_at), acl: row.acl, data: row.data,
    });
  } catch (e) {
    send(res, 500, { error: { code: 'internal', message: e.message } });
  }
}

async function main() {
  await ensureSchema();
  const pluginHook = makePluginHook([PgPubsub]);
  const graphql = postgraphile(pool, 'public', {
    pluginHook,
    subscriptions: true,
    simpleSubscriptions: true,
    websockets: ['v0', 'v1'],
    dynamicJson: true,
    disableQueryLog: true,
    retryOnInitFail: false,
  });
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, `http://${HOST}`);
    if (req.method === 'GET' && url.pathname === '/health') {
      send(res, 200, { status: 'ok' });
      return;
    }
    const doc = /^\/v1\/docs\/([^/]+)$/.exec(url.pathname);
    if (req.method === 'POST' && doc) {
      const type = decodeURIComponent(doc[1]);
      if (!TYPE_RE.test(type)) {
        send(res, 400, { error: { code: 'bad_type', message: 'bad document type' } });
        return;
      }
      createDoc(req, res, type);
      return;
    }
    graphql(req, res);
  });
  enhanceHttpServerWithWebSockets(server, graphql);
  server.listen(port, HOST, () => {
    console.log(`listening on http://${HOST}:${server.address().port}`);
  });
  // A benchmark peer has nothing to save: drop every connection and go (open WebSockets would
  // keep server.close() waiting).
  const stop = () => {
    server.close();
    server.closeAllConnections();
    pool.end().finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  console.error(`error: ${e.stack ?? e}`);
  process.exit(1);
});
