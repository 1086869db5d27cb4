// A real OAuth 2.0 authorization server for tests/provider_oauth2.rs:
// npm's oidc-provider (pinned in package.json beside this file) with dynamic
// client registration (RFC 7591) behind an initial access token, client
// management (RFC 7592), the client credentials grant and token
// introspection (RFC 7662).
//
//   OIDC_PROVIDER_MODULES=<dir holding node_modules/oidc-provider> node tests/oidc/server.js PORT
//
// It listens on 127.0.0.1:PORT (PORT may also come from the environment)
// and, once listening, prints one JSON line on stdout:
//   {"issuer": "...", "initial_access_token": "...", "registration_endpoint": "...",
//    "token_endpoint": "...", "introspection_endpoint": "..."}
//
// Client secrets: RFC 7592 lets a server issue a new client_secret in its
// answer to a PUT and gives the client no standard way to ask for one. This
// server follows the rule keysmith relies on (see src/provider/oauth2.rs): a
// PUT that includes the current client_secret keeps it (RFC 7592 §2.2 lets
// the client include it, and it must match); a PUT without client_secret
// gets a new one. That is a registration policy attached to the initial
// access token, which oidc-provider carries over to every registration
// access token of the clients registered with it. Registration access
// tokens rotate on every PUT (oidc-provider's default).
//
// For the 429 test only: POST /__test/throttle {"count": N, "retry_after": S}
// makes the next N requests to the registration endpoints answer 429 with
// Retry-After: S.
//
// For the fault campaigns: GET /__test/clients answers the ids of the
// clients registered and not deleted, as the server's administrator would
// see them. RFC 7591/7592 give a client no way to list them: this is how a
// test finds a client nobody tracks (an orphan). DELETE /__test/clients/ID
// deletes a client as the server's administrator does (no registration
// access token needed).

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const port = Number(process.argv[2] || process.env.PORT);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node server.js PORT');
  process.exit(2);
}

// oidc-provider is an ES module installed outside the work tree: import it
// by path.
const modules = process.env.OIDC_PROVIDER_MODULES;
if (!modules) {
  console.error('OIDC_PROVIDER_MODULES must name the node_modules folder holding oidc-provider');
  process.exit(2);
}
const packageDir = path.join(modules, 'oidc-provider');
const manifest = JSON.parse(fs.readFileSync(path.join(packageDir, 'package.json'), 'utf8'));
const { default: Provider } = await import(pathToFileURL(path.join(packageDir, manifest.main || 'lib/index.js')).href);

const issuer = `http://127.0.0.1:${port}`;
const ROTATION_POLICY = 'rotate-secret-unless-presented';

function newSecret() {
  return crypto.randomBytes(48).toString('base64url');
}

const provider = new Provider(issuer, {
  scopes: ['openid', 'offline_access', 'read', 'write', 'admin'],
  // RFC 7591's software_id and software_version, kept as metadata.
  extraClientMetadata: { properties: ['software_id', 'software_version'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    registration: {
      enabled: true,
      initialAccessToken: true,
      secretFactory: newSecret,
      policies: {
        [ROTATION_POLICY]: (ctx, properties) => {
          if (ctx.oidc.route === 'client_update' && !('client_secret' in ctx.oidc.body)) {
            properties.client_secret = newSecret();
          }
        },
      },
    },
    registrationManagement: { enabled: true, rotateRegistrationAccessToken: true },
  },
});

let throttle = { count: 0, retryAfter: 1 };
const clients = new Set();
provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/__test/clients') {
    ctx.body = [...clients].sort();
    return;
  }
  if (ctx.method === 'DELETE' && ctx.path.startsWith('/__test/clients/')) {
    const id = decodeURIComponent(ctx.path.slice('/__test/clients/'.length));
    await provider.Client.adapter.destroy(id);
    clients.delete(id);
    ctx.status = 204;
    return;
  }
  if (ctx.method === 'POST' && ctx.path === '/__test/throttle') {
    const chunks = [];
    for await (const chunk of ctx.req) chunks.push(chunk);
    const body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
    throttle = { count: Number(body.count) || 0, retryAfter: Number(body.retry_after) || 1 };
    ctx.status = 204;
    return;
  }
  if (throttle.count > 0 && ctx.path.startsWith('/reg')) {
    throttle.count -= 1;
    ctx.status = 429;
    ctx.set('Retry-After', String(throttle.retryAfter));
    ctx.body = { error: 'slow_down', error_description: 'too many requests' };
    return;
  }
  await next();
  if (ctx.method === 'POST' && ctx.path === '/reg' && ctx.status === 201 && ctx.body && ctx.body.client_id) {
    clients.add(ctx.body.client_id);
  } else if (ctx.method === 'DELETE' && ctx.path.startsWith('/reg/') && ctx.status === 204) {
    clients.delete(decodeURIComponent(ctx.path.slice('/reg/'.length)));
  }
});

const initialAccessToken = await new provider.InitialAccessToken({ policies: [ROTATION_POLICY] }).save();

const server = provider.listen(port, '127.0.0.1', () => {
  const metadata = {
    issuer,
    initial_access_token: initialAccessToken,
    registration_endpoint: `${issuer}/reg`,
    token_endpoint: `${issuer}/token`,
    introspection_endpoint: `${issuer}/token/introspection`,
  };
  process.stdout.write(`${JSON.stringify(metadata)}\n`);
});
server.on('error', (err) => {
  console.error(`cannot listen on 127.0.0.1:${port}: ${err.message}`);
  process.exit(1);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
