#!/usr/bin/env node
// Example session-cache caller in Node.js (@grpc/grpc-js + @grpc/proto-loader).
//
// Shows how a service puts session-cache in front of its identity provider, and checks
// that the server answers as the API promises. The proto is loaded at start-up from
// ../../../proto (google/protobuf imports come with proto-loader), so nothing is generated.
//
//   node client.js HOST:PORT                 # the caller flow (exit 0 when all is as expected)
//   node client.js HOST:PORT --store-down    # the flow while the server's Redis is down
//
// The flow: Get misses and hands out a fence; the caller validates the token with the
// identity provider and Sets the session with that fence; Get hits; InvalidateUser (a
// password change) hides the session; a Set whose validation began before the password
// change is refused as STALE; InvalidateToken (a logout) deletes the session and refuses
// a late Set as REVOKED. `lookup()` is the helper a real service would call on every
// request: it treats UNAVAILABLE, DISABLED and an unreachable cache as "ask the identity
// provider". Any unexpected answer is printed and the exit status is 1.
'use strict';

const crypto = require('node:crypto');
const net = require('node:net');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const CALL_TIMEOUT_MS = 5000;
const DEFAULT_PROTO_DIR = path.resolve(__dirname, '..', '..', '..', 'proto');

function loadService(protoDir) {
  const definition = protoLoader.loadSync('sessioncache/v1/session_cache.proto', {
    includeDirs: [protoDir],
    keepCase: true, // field names as in the proto: session_expire, user_id, ...
    longs: String,
    enums: String, // outcomes as their names: 'GET_OUTCOME_HIT', ...
    defaults: true, // unset fields read as their defaults: fence '' on a HIT
  });
  return grpc.loadPackageDefinition(definition).sessioncache.v1.SessionCache;
}

class Unexpected extends Error {}

function expect(step, condition, detail) {
  if (!condition) throw new Unexpected(`${step}: ${detail}`);
  console.log(`ok   ${step}`);
}

// Promisified unary call with a deadline.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + CALL_TIMEOUT_MS);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

const codeName = (code) => Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
const timestamp = (date) => ({ seconds: String(Math.floor(date.getTime() / 1000)), nanos: 0 });
const sameTimestamp = (a, b) =>
  a != null && b != null && String(a.seconds) === String(b.seconds) && (a.nanos || 0) === (b.nanos || 0);

// --- the identity provider, simulated ---------------------------------------------------

// Stands in for Appwrite or similar: validating a token costs a round trip there.
// Every token it is asked about belongs to the user it was built with.
class IdentityProvider {
  constructor(userId) {
    const now = Date.now();
    this.user = {
      id: userId,
      email: `${userId}@example.com`,
      name: 'Ada Lovelace',
      email_verified: true,
      tier: 'pro',
      created_at: timestamp(new Date('2024-01-15T10:30:00Z')),
      updated_at: timestamp(new Date(now - 24 * 3600 * 1000)),
    };
    this.sessionExpire = timestamp(new Date(now + 3600 * 1000));
    this.calls = 0;
  }

  async validate(_token) {
    this.calls += 1;
    return { user: this.user, sessionExpire: this.sessionExpire };
  }
}

// --- what a service does on each request -------------------------------------------------

// Finds the user of a session token: from the cache when it has it, else from the identity
// provider, caching the answer with the fence from the Get.
//
// UNAVAILABLE (the cache's store did not answer), DISABLED (caching is off) and a failed
// call (the cache itself is unreachable) all mean "ask the identity provider"; without a
// fence nothing is Set, so that a password change during the validation cannot be undone
// by this request.
async function lookup(client, token, idp) {
  let got;
  try {
    got = await call(client, 'Get', { token });
  } catch (err) {
    const { user, sessionExpire } = await idp.validate(token);
    return { user, sessionExpire, source: 'identity provider', why: `Get failed: ${codeName(err.code)}`, setOutcome: null };
  }
  switch (got.outcome) {
    case 'GET_OUTCOME_HIT':
      return { user: got.user, sessionExpire: got.session_expire, source: 'cache', why: got.outcome, setOutcome: null };
    case 'GET_OUTCOME_UNAVAILABLE':
    case 'GET_OUTCOME_DISABLED': {
      const { user, sessionExpire } = await idp.validate(token);
      return { user, sessionExpire, source: 'identity provider', why: got.outcome, setOutcome: null };
    }
    case 'GET_OUTCOME_MISS':
    case 'GET_OUTCOME_EXPIRED':
    case 'GET_OUTCOME_INVALIDATED':
    case 'GET_OUTCOME_CORRUPT': {
      const { user, sessionExpire } = await idp.validate(token);
      let setOutcome;
      try {
        const stored = await call(client, 'Set', { token, user, session_expire: sessionExpire, fence: got.fence });
        setOutcome = stored.outcome;
      } catch (err) {
        setOutcome = `Set failed: ${codeName(err.code)}`; // the user is valid all the same
      }
      return { user, sessionExpire, source: 'identity provider', why: got.outcome, setOutcome };
    }
    default:
      throw new Unexpected(`Get answered ${got.outcome}`);
  }
}

// Records a password change. gRPC UNAVAILABLE means the store did not acknowledge it:
// retry (here a bounded number of times, then the error is the caller's).
async function invalidateUser(client, userId, attempts = 3) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await call(client, 'InvalidateUser', { user_id: userId });
    } catch (err) {
      if (err.code !== grpc.status.UNAVAILABLE || attempt >= attempts) throw err;
      await new Promise((resolve) => setTimeout(resolve, 100 * attempt));
    }
  }
}

// --- the checks ---------------------------------------------------------------------------

function sameUser(a, b) {
  return (
    a != null &&
    ['id', 'email', 'name', 'email_verified', 'tier'].every((f) => a[f] === b[f]) &&
    sameTimestamp(a.created_at, b.created_at) &&
    sameTimestamp(a.updated_at, b.updated_at)
  );
}

const show = (value) => JSON.stringify(value);

async function flow(client) {
  const run = crypto.randomBytes(6).toString('hex');
  const idp = new IdentityProvider(`node-user-${run}`);
  const token = `node-token-${run}-a`;

  // 1. A miss hands out a fence.
  let got = await call(client, 'Get', { token });
  expect('Get of a new token misses with a fence', got.outcome === 'GET_OUTCOME_MISS' && got.fence !== '', `got ${show(got)}`);

  // 2. Validate with the identity provider, then Set with that fence.
  let { user, sessionExpire } = await idp.validate(token);
  const stored = await call(client, 'Set', { token, user, session_expire: sessionExpire, fence: got.fence });
  expect(
    'Set with the fence is STORED',
    stored.outcome === 'SET_OUTCOME_STORED' && stored.ttl_seconds >= 1 && stored.ttl_seconds <= 3600,
    `got ${show(stored)}`,
  );

  // 3. The next Get hits, with the user as the identity provider described it.
  got = await call(client, 'Get', { token });
  expect('Get after Set hits', got.outcome === 'GET_OUTCOME_HIT', `got ${show(got)}`);
  expect(
    'the hit carries the user and session_expire that were Set',
    sameUser(got.user, user) && sameTimestamp(got.session_expire, sessionExpire) && got.fence === '',
    `got ${show(got)}`,
  );
  let found = await lookup(client, token, idp);
  expect('lookup() answers from the cache', found.source === 'cache' && found.user.id === user.id, `got ${show(found)}`);

  // 4. A password change hides every session of the user.
  const marked = await invalidateUser(client, user.id);
  expect('InvalidateUser records an instant', marked.invalidated_at && Number(marked.invalidated_at.seconds) > 0, `got ${show(marked)}`);
  got = await call(client, 'Get', { token });
  expect(
    'Get after InvalidateUser answers INVALIDATED with a fence',
    got.outcome === 'GET_OUTCOME_INVALIDATED' && got.fence !== '',
    `got ${show(got)}`,
  );

  // 5. A validation that began before a password change must not be cached.
  const tokenB = `node-token-${run}-b`;
  got = await call(client, 'Get', { token: tokenB });
  expect('Get of a second token misses with a fence', got.outcome === 'GET_OUTCOME_MISS' && got.fence !== '', `got ${show(got)}`);
  const oldFence = got.fence;
  ({ user, sessionExpire } = await idp.validate(tokenB)); // ...meanwhile the password changes:
  await invalidateUser(client, user.id);
  const stale = await call(client, 'Set', { token: tokenB, user, session_expire: sessionExpire, fence: oldFence });
  expect('Set with a fence older than the InvalidateUser is STALE', stale.outcome === 'SET_OUTCOME_STALE', `got ${show(stale)}`);
  got = await call(client, 'Get', { token: tokenB });
  expect('nothing was cached by the stale Set', got.outcome === 'GET_OUTCOME_MISS', `got ${show(got)}`);

  // 6. A fresh validation after the password change is cached again, through lookup().
  found = await lookup(client, tokenB, idp);
  expect(
    'lookup() of a missed token asks the identity provider and caches the answer',
    found.source === 'identity provider' && found.setOutcome === 'SET_OUTCOME_STORED',
    `got ${show(found)}`,
  );
  found = await lookup(client, tokenB, idp);
  expect('lookup() then answers from the cache', found.source === 'cache', `got ${show(found)}`);

  // 7. Logout deletes the session and refuses a Set that arrives late.
  const gone = await call(client, 'InvalidateToken', { token: tokenB });
  expect('InvalidateToken deletes the cached session', gone.deleted === true, `got ${show(gone)}`);
  got = await call(client, 'Get', { token: tokenB });
  expect('Get after InvalidateToken misses', got.outcome === 'GET_OUTCOME_MISS', `got ${show(got)}`);
  const late = await call(client, 'Set', { token: tokenB, user, session_expire: sessionExpire, fence: got.fence });
  expect('a Set after the logout is REVOKED', late.outcome === 'SET_OUTCOME_REVOKED', `got ${show(late)}`);
}

// A stand-in client whose Get answers one outcome, to show lookup() on outcomes a healthy
// server does not give; it fails the run if lookup() Sets without a fence.
function fakeCache(outcome) {
  return {
    Get: (_request, _options, callback) => callback(null, { outcome, fence: '' }),
    Set: () => {
      throw new Unexpected('lookup() called Set although Get gave no fence');
    },
  };
}

function closedLoopbackPort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function unavailableIsAMiss(SessionCache) {
  const idp = new IdentityProvider('node-user-fallback');
  for (const outcome of ['GET_OUTCOME_UNAVAILABLE', 'GET_OUTCOME_DISABLED']) {
    const found = await lookup(fakeCache(outcome), 'node-token-fallback', idp);
    expect(
      `lookup() on ${outcome} asks the identity provider and Sets nothing`,
      found.source === 'identity provider' && found.why === outcome && found.setOutcome === null,
      `got ${show(found)}`,
    );
  }

  // A cache that cannot be reached at all is a miss too (a closed loopback port).
  const port = await closedLoopbackPort();
  const unreachable = new SessionCache(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  try {
    const found = await lookup(unreachable, 'node-token-fallback', idp);
    expect(
      'lookup() with the cache unreachable asks the identity provider',
      found.source === 'identity provider' && found.why === 'Get failed: UNAVAILABLE',
      `got ${show(found)}`,
    );
  } finally {
    unreachable.close();
  }
}

// The server runs on Redis, and Redis is stopped: Get and Set degrade to UNAVAILABLE,
// the invalidations fail with gRPC UNAVAILABLE.
async function storeDown(client) {
  const run = crypto.randomBytes(6).toString('hex');
  const idp = new IdentityProvider(`node-user-${run}`);
  const token = `node-token-${run}-down`;
  const started = Date.now();
  const got = await call(client, 'Get', { token });
  expect('Get with the store down answers UNAVAILABLE without a fence', got.outcome === 'GET_OUTCOME_UNAVAILABLE' && got.fence === '', `got ${show(got)}`);
  expect('...and promptly', Date.now() - started < 2000, `took ${Date.now() - started} ms`);
  const found = await lookup(client, token, idp);
  expect(
    'lookup() treats it as a miss: asks the identity provider, Sets nothing',
    found.source === 'identity provider' && found.why === 'GET_OUTCOME_UNAVAILABLE' && found.setOutcome === null && idp.calls === 1,
    `got ${show(found)}`,
  );
  const { user, sessionExpire } = await idp.validate(token);
  const stored = await call(client, 'Set', { token, user, session_expire: sessionExpire });
  expect('Set with the store down answers UNAVAILABLE', stored.outcome === 'SET_OUTCOME_UNAVAILABLE', `got ${show(stored)}`);
  for (const [step, attempt] of [
    ['InvalidateUser fails with gRPC UNAVAILABLE after bounded retries', () => invalidateUser(client, user.id, 3)],
    ['InvalidateToken fails with gRPC UNAVAILABLE', () => call(client, 'InvalidateToken', { token })],
  ]) {
    let code = 'OK';
    try {
      await attempt();
    } catch (err) {
      code = codeName(err.code);
    }
    expect(step, code === 'UNAVAILABLE', `got ${code}`);
  }
}

function waitForReady(client) {
  return new Promise((resolve, reject) =>
    client.waitForReady(new Date(Date.now() + CALL_TIMEOUT_MS), (err) => (err ? reject(err) : resolve())),
  );
}

async function main() {
  const args = process.argv.slice(2);
  const storeDownMode = args.includes('--store-down');
  const protoFlag = args.indexOf('--proto-dir');
  const protoDir = protoFlag >= 0 ? path.resolve(args[protoFlag + 1]) : DEFAULT_PROTO_DIR;
  const address = args.find((a, i) => !a.startsWith('--') && (protoFlag < 0 || i !== protoFlag + 1));
  if (!address) {
    console.error('usage: node client.js HOST:PORT [--store-down] [--proto-dir DIR]');
    return 2;
  }

  const SessionCache = loadService(protoDir);
  const client = new SessionCache(address, grpc.credentials.createInsecure());
  try {
    try {
      await waitForReady(client);
    } catch {
      console.log(`FAIL: no session-cache at ${address} within ${CALL_TIMEOUT_MS / 1000}s`);
      return 1;
    }
    if (storeDownMode) {
      await storeDown(client);
    } else {
      await flow(client);
      await unavailableIsAMiss(SessionCache);
    }
  } catch (err) {
    if (err instanceof Unexpected) console.log(`FAIL: ${err.message}`);
    else if (err.code !== undefined) console.log(`FAIL: a call failed: ${codeName(err.code)}: ${err.details}`);
    else console.log(`FAIL: ${err.stack || err}`);
    return 1;
  } finally {
    client.close();
  }
  console.log(`all checks passed against ${address}${storeDownMode ? ' (store down)' : ''}`);
  return 0;
}

main().then((code) => {
  process.exitCode = code;
});
