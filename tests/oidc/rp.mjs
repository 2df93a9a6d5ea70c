// Independent OpenID Connect relying party used by the Rust integration tests.
//
// The point of this script is that none of the protocol checks are ours: every
// token, id_token and metadata validation is done by `openid-client` (a
// certified RP library), so a bug shared between our server and a Rust-written
// test client cannot cancel itself out. Only the "browser" (login + consent
// forms) is hand-driven with plain fetch, because no RP library does that.
//
// Input: env ISSUER, CLIENT_ID, CLIENT_SECRET (empty = public client),
// REDIRECT_URI, HANDLE, PASSWORD, SCOPE. With REGISTER=1 the client is instead
// registered by openid-client itself (RFC 7591, with INITIAL_ACCESS_TOKEN if set)
// and CLIENT_ID / CLIENT_SECRET are not read.
// Output: one JSON object on stdout; exit 0, or {"error","step"} and exit 1.
import * as client from 'openid-client';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`missing env ${name}`);
  return v;
};

let step = 'setup'; // reported on failure so the Rust side knows where it broke
const out = {};

// Expected failures (refresh reuse etc.) are recorded, not thrown; keep only the
// fields that say *why* it failed, never the response object.
const errInfo = (e) => ({
  name: e?.name, code: e?.code, error: e?.error,
  error_description: e?.error_description, status: e?.status, message: e?.message,
});

// ---- a minimal browser: manual redirects and a per-origin cookie jar --------
const jar = new Map(); // origin -> Map(name -> value)

async function browse(url, init = {}) {
  url = new URL(url);
  const cookies = jar.get(url.origin);
  const headers = new Headers(init.headers);
  if (cookies?.size) {
    headers.set('cookie', [...cookies].map(([k, v]) => `${k}=${v}`).join('; '));
  }
  const res = await fetch(url, {
    ...init, headers, redirect: 'manual', signal: AbortSignal.timeout(15_000),
  });
  // Only name=value matters to us; attributes (Path, HttpOnly, SameSite) are the
  // server's business. An empty value or Max-Age=0 is how a server deletes one.
  for (const line of res.headers.getSetCookie()) {
    const [pair, ...attrs] = line.split(';');
    const eq = pair.indexOf('=');
    if (eq < 1) continue;
    const name = pair.slice(0, eq).trim();
    const value = pair.slice(eq + 1).trim();
    const c = jar.get(url.origin) ?? new Map();
    jar.set(url.origin, c);
    if (!value || attrs.some((a) => /^\s*max-age\s*=\s*0\s*$/i.test(a))) c.delete(name);
    else c.set(name, value);
  }
  return res;
}

const unescapeHtml = (s) => s
  .replace(/&quot;/g, '"').replace(/&#39;/g, "'").replace(/&#x27;/gi, "'")
  .replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&amp;/g, '&');

// Attributes are read from each tag in any order, so the server is free to
// reorder them (name before value or not) without breaking the driver.
function attrsOf(tag) {
  const a = {};
  for (const m of tag.matchAll(/([a-zA-Z_:][-\w:.]*)\s*=\s*"([^"]*)"/g)) a[m[1].toLowerCase()] = unescapeHtml(m[2]);
  return a;
}

function parseForm(html, pageUrl) {
  const formTag = html.match(/<form\b[^>]*>/i);
  if (!formTag) return undefined;
  const form = attrsOf(formTag[0]);
  const fields = {};
  const inputs = [];
  for (const m of html.matchAll(/<(input|button)\b[^>]*>/gi)) {
    const a = attrsOf(m[0]);
    if (a.name === undefined) continue;
    inputs.push({ tag: m[1].toLowerCase(), type: a.type, name: a.name, value: a.value });
    if (a.type === 'hidden') fields[a.name] = a.value ?? '';
  }
  return {
    method: (form.method ?? 'get').toLowerCase(),
    action: new URL(form.action ?? '', pageUrl),
    fields, inputs,
  };
}

// Walks from the authorization URL to the redirect back to the client, filling
// in whichever pages the server shows (login, consent, both or none). Returns the
// callback URL plus a trace of what was seen, for the Rust test to assert on.
async function runBrowser(authUrl, redirectUri) {
  // Compare without the query, so any code/state/iss the server appends matches.
  const target = new URL(redirectUri);
  const isCallback = (u) => u.origin === target.origin && u.pathname === target.pathname;
  const trace = [];
  let res = await browse(authUrl);
  let url = authUrl;
  let loginPosted = false;
  trace.push({ method: 'GET', path: url.pathname, status: res.status });
  for (let hops = 0; hops < 10; hops++) {
    if (res.status >= 300 && res.status < 400) {
      const loc = res.headers.get('location');
      if (!loc) throw new Error(`${res.status} without location`);
      const next = new URL(loc, url);
      if (isCallback(next)) {
        return { callback: next, redirect_status: res.status, trace };
      }
      url = next;
      res = await browse(url);
      trace.push({ method: 'GET', path: url.pathname, status: res.status });
      continue;
    }
    const html = await res.text();
    if (res.status !== 200) throw new Error(`unexpected ${res.status} at ${url.pathname}: ${html.slice(0, 300)}`);
    const form = parseForm(html, url);
    if (!form) throw new Error(`no form at ${url.pathname}: ${html.slice(0, 300)}`);
    const body = new URLSearchParams(form.fields);
    let entry;
    if (form.action.pathname.endsWith('/oauth/login')) {
      // Seeing the login form twice means the credentials were refused.
      if (loginPosted) throw new Error('login form shown again after posting credentials');
      loginPosted = true;
      entry = { page: 'login' };
      body.set('handle', env('HANDLE'));
      body.set('password', env('PASSWORD'));
    } else if (form.action.pathname.endsWith('/oauth/consent')) {
      const buttons = form.inputs.filter((i) => i.name === 'decision').map((i) => i.value);
      entry = { page: 'consent', decision_buttons: buttons };
      body.set('decision', 'allow');
    } else {
      throw new Error(`unknown form action ${form.action.href}`);
    }
    trace.push({ ...entry, hidden: Object.keys(form.fields).sort(), csrf_present: !!form.fields.csrf });
    url = form.action;
    res = await browse(url, {
      method: form.method.toUpperCase(),
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body,
    });
    trace.push({ method: 'POST', path: url.pathname, status: res.status });
  }
  throw new Error('too many hops without reaching redirect_uri');
}

// Steps 2-4: one full authorization code + PKCE flow.
async function authorize(config, label) {
  const redirectUri = env('REDIRECT_URI');
  step = `${label}:authorize_url`;
  const pkceCodeVerifier = client.randomPKCECodeVerifier();
  const state = client.randomState();
  const nonce = client.randomNonce();
  const authUrl = client.buildAuthorizationUrl(config, {
    redirect_uri: redirectUri,
    scope: env('SCOPE'),
    code_challenge: await client.calculatePKCECodeChallenge(pkceCodeVerifier),
    code_challenge_method: 'S256',
    state,
    nonce,
  });

  step = `${label}:browser`;
  const b = await runBrowser(authUrl, redirectUri);
  const cb = b.callback.searchParams;
  const login = {
    redirect_status: b.redirect_status,
    trace: b.trace,
    callback_has_code: cb.has('code'),
    callback_state_matches: cb.get('state') === state,
    callback_iss: cb.get('iss'),
    callback_error: cb.get('error'),
  };

  // openid-client checks state, iss (strictly, if present or advertised), sends
  // the verifier, and validates id_token iss/aud/exp/iat/nonce/alg itself.
  step = `${label}:code_grant`;
  const tokens = await client.authorizationCodeGrant(config, b.callback, {
    pkceCodeVerifier, expectedState: state, expectedNonce: nonce, idTokenExpected: true,
  });
  return { login, tokens, claims: tokens.claims() };
}

async function main() {
  const redirectUri = env('REDIRECT_URI');

  let config;
  if (env('REGISTER', '') === '1') {
    step = 'registration';
    config = await client.dynamicClientRegistration(
      new URL(env('ISSUER')),
      {
        redirect_uris: [redirectUri],
        post_logout_redirect_uris: [`${redirectUri}/logged-out`],
        client_name: 'Dynamically registered RP',
        scope: env('SCOPE'),
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        token_endpoint_auth_method: 'client_secret_post',
        logo_uri: 'https://rp.example/logo.png', // unknown to the server: ignored (RFC 7591 §2)
      },
      undefined, // authenticate with the issued secret, as registered (client_secret_post)
      {
        initialAccessToken: env('INITIAL_ACCESS_TOKEN', '') || undefined,
        execute: [client.allowInsecureRequests], // loopback http in tests
      },
    );
    const cm = config.clientMetadata();
    out.registration = {
      client_id: cm.client_id,
      client_secret_present: !!cm.client_secret,
      token_endpoint_auth_method: cm.token_endpoint_auth_method,
      scope: cm.scope,
    };
  } else {
    const clientId = env('CLIENT_ID');
    const secret = env('CLIENT_SECRET', '');
    step = 'discovery';
    config = await client.discovery(
      new URL(env('ISSUER')), clientId,
      secret ? { client_secret: secret } : undefined,
      secret ? client.ClientSecretBasic(secret) : client.None(),
      { execute: [client.allowInsecureRequests] }, // loopback http in tests
    );
  }
  const md = config.serverMetadata();
  out.discovery = {
    supports_pkce_s256: md.supportsPKCE('S256'),
    ...Object.fromEntries([
      'issuer', 'authorization_endpoint', 'token_endpoint', 'userinfo_endpoint', 'jwks_uri',
      'introspection_endpoint', 'revocation_endpoint', 'end_session_endpoint',
      'scopes_supported', 'response_types_supported', 'grant_types_supported',
      'code_challenge_methods_supported', 'token_endpoint_auth_methods_supported',
      'id_token_signing_alg_values_supported', 'subject_types_supported',
      'authorization_response_iss_parameter_supported', 'claims_supported',
    ].map((k) => [k, md[k]])),
  };

  const first = await authorize(config, 'first');
  const t1 = first.tokens;
  out.login = first.login;
  out.code_grant = {
    access_token_present: !!t1.access_token,
    refresh_token_present: !!t1.refresh_token,
    id_token_present: !!t1.id_token,
    token_type: t1.token_type, // lower-cased by the library
    expires_in: t1.expires_in,
    scope: t1.scope,
  };
  out.id_token_claims = first.claims;

  step = 'userinfo';
  out.userinfo = await client.fetchUserInfo(config, t1.access_token, first.claims.sub);

  // Rotation: a used refresh token must die, and replaying it must take the
  // whole family (including the one just issued) down with it.
  step = 'refresh';
  const refresh1 = t1.refresh_token;
  const t2 = await client.refreshTokenGrant(config, refresh1);
  out.refresh = {
    rotated: !!t2.refresh_token && t2.refresh_token !== refresh1,
    new_access_token_present: !!t2.access_token,
    new_access_token_differs: t2.access_token !== t1.access_token,
    scope: t2.scope,
  };
  const tryRefresh = async (rt) => {
    try { await client.refreshTokenGrant(config, rt); return { failed: false }; }
    catch (e) { return { failed: true, ...errInfo(e) }; }
  };
  step = 'refresh_reuse';
  out.refresh.reuse_error = await tryRefresh(refresh1);
  step = 'refresh_family';
  out.refresh.family_revoked_error = t2.refresh_token ? await tryRefresh(t2.refresh_token) : null;

  // A second flow reuses the browser session, so login/consent may be skipped.
  const second = await authorize(config, 'second');
  const t3 = second.tokens;
  out.second_login = second.login;

  step = 'introspection';
  const before = await client.tokenIntrospection(config, t3.access_token);
  step = 'revocation';
  await client.tokenRevocation(config, t3.refresh_token, { token_type_hint: 'refresh_token' });
  step = 'introspection_after_revoke';
  const rtAfter = await client.tokenIntrospection(config, t3.refresh_token);
  const atAfter = await client.tokenIntrospection(config, t3.access_token);
  out.introspection = {
    access_active_before: before.active,
    before,
    refresh_active_after: rtAfter.active,
    access_active_after: atAfter.active,
  };
  // Raw tokens for checks the library does not make (the ID token's signature against the
  // JWKS; the revoked access token against the document API).
  out.tokens = { id_token: t1.id_token, revoked_access_token: t3.access_token };

  step = 'end_session';
  if (md.end_session_endpoint) {
    const logoutState = client.randomState();
    const url = client.buildEndSessionUrl(config, {
      id_token_hint: t3.id_token,
      post_logout_redirect_uri: `${redirectUri}/logged-out`,
      state: logoutState,
    });
    const res = await browse(url);
    const location = res.headers.get('location');
    await res.body?.cancel();
    out.end_session = {
      status: res.status,
      location,
      state_echoed: location ? new URL(location, url).searchParams.get('state') === logoutState : false,
    };
  } else {
    out.end_session = { skipped: 'no end_session_endpoint in discovery' };
  }

  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(0); // don't wait for idle keep-alive sockets
}

// The library often hangs the evidence (expected value, offending body or the
// raw Response) on `cause`; turn it into something JSON can carry.
async function describeCause(c) {
  if (c === undefined) return undefined;
  if (c instanceof Response) {
    const body = c.bodyUsed ? undefined : (await c.text().catch(() => undefined))?.slice(0, 1000);
    return { status: c.status, url: c.url, body };
  }
  if (c instanceof URLSearchParams) return Object.fromEntries(c);
  try { return JSON.parse(JSON.stringify(c, (_k, v) => (v instanceof URLSearchParams ? Object.fromEntries(v) : v))); }
  catch { return String(c); }
}

main().catch(async (e) => {
  const details = { ...errInfo(e), cause: await describeCause(e?.cause) };
  process.stdout.write(`${JSON.stringify({ error: e?.message ?? String(e), step, details, partial: out })}\n`);
  process.exit(1);
});
