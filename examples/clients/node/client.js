#!/usr/bin/env node
// Example session-cache caller in Node.js (@grpc/grpc-js + @grpc/proto-loader).
//
// Shows how a service puts session-cache in front of its identity provider, and checks
// that the server answers as the API promises. The proto is loaded at start-up from
// ../../../proto (google/protobuf imports come with proto-loader), so nothing is generated.
//
//   node client.js HOST:PORT --validate TOKEN  # the one-call flow (server with --idp)
//   node client.js HOST:PORT                   # the Get/Set flow (exit 0 when all is as expected)
//   node client.js HOST:PORT --store-down      # the Get/Set flow while the server's Redis is down
//
// The one-call flow, the recommended way: `validate()` is the helper a real service calls
// on every request. It sends Validate(token); the server answers from its cache or, on a
// miss, asks the identity provider it was started with (--idp) and caches the answer.
// VALID gives the user; INVALID means answer 401 to the end user; UNAVAILABLE, or the
// cache unreachable, means answer 503 (retryable): never treat the token as valid. With
// --validate TOKEN (a session the server's identity provider honours) the client checks:
// Validate -> VALID with the user; again -> VALID (from the cache); an unknown token ->
// INVALID, twice (the second from the negative cache); `logout()` (the session signed out
// at Appwrite when --appwrite-endpoint is given, then InvalidateToken) -> Validate answers
// INVALID.
//
// The Get/Set flow, for callers that validate with the identity provider themselves: Get
// misses and hands out a fence; the caller validates the token with the identity provider
// and Sets the session with that fence; Get hits; InvalidateUser (a password change) hides
// the session; a Set whose validation began before the password change is refused as
// STALE; InvalidateToken (a logout) deletes the session and refuses a late Set as REVOKED.
// `lookup()` is the helper such a service would call on every request: it treats
// UNAVAILABLE, DISABLED and an unreachable cache as "ask the identity provider". Any
// unexpected answer is printed and the exit status is 1.
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

// --- the one-call flow: what a service does on each request -------------------------------

// The token is no valid session: answer the end user 401.
class Unauthenticated extends Error {}

// Nobody could say whether the token is valid (the identity provider or the cache could
// not answer): answer the end user 503, a retryable error. Never let the request through.
class RetryLater extends Error {}

// Who the session token belongs to, in one call: session-cache answers from its cache or
// asks the identity provider it is configured with (--idp).
//
// VALID resolves to { user, sessionExpire }. INVALID (the provider refused the token, now
// or within --negative-ttl-seconds) rejects with Unauthenticated: 401. UNAVAILABLE (the
// provider could not be asked), an unknown outcome and a failed call (the cache
// unreachable, or FAILED_PRECONDITION: the server has no --idp) reject with RetryLater:
// 503. A token the server refuses as malformed (INVALID_ARGUMENT: empty, over 4 KiB) is
// no session either: Unauthenticated.
async function validate(client, token) {
  let answer;
  try {
    answer = await call(client, 'Validate', { token });
  } catch (err) {
    if (err.code === grpc.status.INVALID_ARGUMENT) throw new Unauthenticated(`Validate refused the token: ${err.details}`);
    throw new RetryLater(`Validate failed: ${codeName(err.code)}`);
  }
  if (answer.outcome === 'VALIDATE_OUTCOME_VALID') return { user: answer.user, sessionExpire: answer.session_expire };
  if (answer.outcome === 'VALIDATE_OUTCOME_INVALID') throw new Unauthenticated(answer.outcome);
  throw new RetryLater(String(answer.outcome));
}

// validate() as an HTTP handler uses it: { status: 200, user }, { status: 401 } or { status: 503 }.
async function statusFor(client, token) {
  try {
    return { status: 200, user: (await validate(client, token)).user };
  } catch (err) {
    if (err instanceof Unauthenticated) return { status: 401 };
    if (err instanceof RetryLater) return { status: 503 };
    throw err;
  }
}

// DELETE /account/sessions/current as the session's owner; 401 means Appwrite no longer
// knows the session, which is what was wanted.
async function signOutAtAppwrite(token, appwrite) {
  const response = await fetch(`${appwrite.endpoint.replace(/\/+$/, '')}/account/sessions/current`, {
    method: 'DELETE',
    headers: { 'X-Appwrite-Project': appwrite.project, 'X-Appwrite-Session': token, 'Content-Type': 'application/json' },
    signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
  });
  if (!response.ok && response.status !== 401) {
    throw new Error(`Appwrite answered the sign-out with HTTP ${response.status}: ${await response.text()}`);
  }
}

// Logs a session out: at the identity provider (appwrite: { endpoint, project }, when
// given), then InvalidateToken, retried on gRPC UNAVAILABLE (the store did not acknowledge
// it). The cache is invalidated even when the provider could not be reached (that error is
// thrown after). Resolves to InvalidateToken's answer.
async function logout(client, token, appwrite, attempts = 3) {
  let failure = null;
  if (appwrite) {
    try {
      await signOutAtAppwrite(token, appwrite);
    } catch (err) {
      failure = err;
    }
  }
  let gone;
  for (let attempt = 1; ; attempt += 1) {
    try {
      gone = await call(client, 'InvalidateToken', { token });
      break;
    } catch (err) {
      if (err.code !== grpc.status.UNAVAILABLE || attempt >= attempts) throw err;
      await new Promise((resolve) => setTimeout(resolve, 100 * attempt));
    }
  }
  if (failure) throw failure;
  return gone;
}

// --- the Get/Set flow: for callers that validate with the identity provider themselves ---
// The identity provider, simulated, then what such a service does on each request.


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

// --- the checks: the one-call flow ------------------------------------------------------

const REPEATS = 3; // Validates of the known token after the first, all from the cache

const future = (stamp) => stamp != null && Number(stamp.seconds) * 1000 > Date.now();

// Validate against a server with --idp; `token` is a session its provider honours.
async function oneCallFlow(client, token, expectUser, appwrite) {
  const got = await call(client, 'Validate', { token });
  expect(
    'Validate of a known token is VALID with the user',
    got.outcome === 'VALIDATE_OUTCOME_VALID' && got.user && got.user.id !== '' &&
      (expectUser == null || got.user.id === expectUser) && future(got.session_expire),
    `got ${show(got)}`,
  );
  console.log(`     user ${got.user.id} <${got.user.email}> tier '${got.user.tier}', session until ${new Date(Number(got.session_expire.seconds) * 1000).toISOString()}`);
  for (let i = 0; i < REPEATS; i += 1) {
    const again = await validate(client, token);
    expect(
      'validate() of it again is VALID, the same user and expiry (from the cache)',
      sameUser(again.user, got.user) && sameTimestamp(again.sessionExpire, got.session_expire),
      `got ${show(again)}`,
    );
  }
  const ok = await statusFor(client, token);
  expect('statusFor() of it is 200 with the user', ok.status === 200 && sameUser(ok.user, got.user), `got ${show(ok)}`);

  const unknown = `node-unknown-${crypto.randomBytes(6).toString('hex')}`;
  for (const attempt of ['', ' again (from the negative cache)']) {
    const answer = await call(client, 'Validate', { token: unknown });
    expect(
      `Validate of an unknown token${attempt} is INVALID, with no user`,
      answer.outcome === 'VALIDATE_OUTCOME_INVALID' && answer.user == null,
      `got ${show(answer)}`,
    );
  }
  const refused = await statusFor(client, unknown);
  expect('statusFor() of the unknown token is 401', refused.status === 401, `got ${show(refused)}`);

  const where = appwrite ? 'at Appwrite and in the cache' : 'in the cache';
  const gone = await logout(client, token, appwrite);
  expect(`logout() signs the session out ${where}; InvalidateToken deletes the cached entry`, gone.deleted === true, `got ${show(gone)}`);
  const after = await call(client, 'Validate', { token });
  expect('Validate after the logout is INVALID', after.outcome === 'VALIDATE_OUTCOME_INVALID', `got ${show(after)}`);
  let thrown = null;
  try {
    await validate(client, token);
  } catch (err) {
    thrown = err;
  }
  expect('validate() after the logout rejects with Unauthenticated (401)', thrown instanceof Unauthenticated, `got ${thrown}`);
}

// A stand-in client whose Validate answers one outcome, to show validate() on answers a
// healthy server with a healthy provider does not give.
function fakeValidate(outcome) {
  return { Validate: (_request, _options, callback) => callback(null, { outcome, user: null, session_expire: null }) };
}

async function unavailableIsRetryable(SessionCache) {
  for (const outcome of ['VALIDATE_OUTCOME_UNAVAILABLE', 'VALIDATE_OUTCOME_UNSPECIFIED']) {
    const answer = await statusFor(fakeValidate(outcome), 'node-token-fallback');
    expect(`validate() on ${outcome} rejects with RetryLater (503), never a user`, answer.status === 503, `got ${show(answer)}`);
  }
  const port = await closedLoopbackPort();
  const unreachable = new SessionCache(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  try {
    let thrown = null;
    try {
      await validate(unreachable, 'node-token-fallback');
    } catch (err) {
      thrown = err;
    }
    expect(
      'validate() with the cache unreachable rejects with RetryLater (503)',
      thrown instanceof RetryLater && thrown.message === 'Validate failed: UNAVAILABLE',
      `got ${thrown}`,
    );
  } finally {
    unreachable.close();
  }
}

// --- the checks: the Get/Set flow ---------------------------------------------------------

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

// Flags that take a value, and whether the flag was given.
function parseArgs(argv) {
  const valued = ['--proto-dir', '--validate', '--expect-user', '--appwrite-endpoint', '--appwrite-project'];
  const options = { positional: [] };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (valued.includes(arg)) {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      options[arg] = argv[(i += 1)];
    } else if (arg === '--store-down') {
      options[arg] = true;
    } else if (arg.startsWith('--')) {
      throw new Error(`unknown flag ${arg}`);
    } else {
      options.positional.push(arg);
    }
  }
  return options;
}

const USAGE =
  'usage: node client.js HOST:PORT [--validate TOKEN [--expect-user ID] [--appwrite-endpoint URL --appwrite-project ID]]\n' +
  '                                [--store-down] [--proto-dir DIR]';

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
    if (options.positional.length !== 1) throw new Error('give one HOST:PORT');
    if (options['--validate'] !== undefined && options['--store-down']) throw new Error('--validate and --store-down are different flows: give one');
    if (!options['--appwrite-endpoint'] !== !options['--appwrite-project']) throw new Error('--appwrite-endpoint and --appwrite-project go together');
  } catch (err) {
    console.error(`client.js: ${err.message}\n${USAGE}`);
    return 2;
  }
  const [address] = options.positional;
  const storeDownMode = options['--store-down'] === true;
  const token = options['--validate'];
  const appwrite = options['--appwrite-endpoint'] ? { endpoint: options['--appwrite-endpoint'], project: options['--appwrite-project'] } : null;
  const protoDir = options['--proto-dir'] ? path.resolve(options['--proto-dir']) : DEFAULT_PROTO_DIR;

  const SessionCache = loadService(protoDir);
  const client = new SessionCache(address, grpc.credentials.createInsecure());
  try {
    try {
      await waitForReady(client);
    } catch {
      console.log(`FAIL: no session-cache at ${address} within ${CALL_TIMEOUT_MS / 1000}s`);
      return 1;
    }
    if (token !== undefined) {
      await oneCallFlow(client, token, options['--expect-user'], appwrite);
      await unavailableIsRetryable(SessionCache);
    } else if (storeDownMode) {
      await storeDown(client);
    } else {
      await flow(client);
      await unavailableIsAMiss(SessionCache);
    }
  } catch (err) {
    if (err instanceof Unexpected) console.log(`FAIL: ${err.message}`);
    else if (err instanceof Unauthenticated || err instanceof RetryLater) console.log(`FAIL: ${err.constructor.name}: ${err.message}`);
    else if (err.code !== undefined && err.details !== undefined) console.log(`FAIL: a call failed: ${codeName(err.code)}: ${err.details}`);
    else console.log(`FAIL: ${err.stack || err}`);
    return 1;
  } finally {
    client.close();
  }
  const mode = token !== undefined ? ' (one-call flow)' : storeDownMode ? ' (store down)' : '';
  console.log(`all checks passed against ${address}${mode}`);
  return 0;
}

main().then((code) => {
  process.exitCode = code;
});
