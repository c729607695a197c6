// The journeys of docs/journeys.md through the Node SDK, against the real service: a payment
// provider's return URL, an OAuth round trip with the token in `state`, and a mobile app's
// backend preparing the link the app opens. Domain B is a real Express app with the middleware.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import express from "express";

import { IdentityClient, InvalidRequest, TokenNotFound, handoffMiddleware } from "../dist/esm/index.js";
import { WRITE_KEY, startService } from "./helpers.mjs";

let service;
let identity;
let site;
let origin;

before(async () => {
  service = await startService();
  identity = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
  const app = express();
  app.use(handoffMiddleware(identity, { secure: false }));
  // The OAuth callback exchanges the token the `state` parameter carried.
  app.get("/oauth/callback", async (req, res) => {
    try {
      const visitor = await identity.exchange(String(req.query.state), { event: "Signed In" });
      res.json({ anonymousId: visitor.anonymousId, code: req.query.code });
    } catch (error) {
      res.status(error instanceof TokenNotFound ? 400 : 502).json({ error: error.name });
    }
  });
  app.get("/*page", (req, res) => res.json({ anonymousId: req.identity?.anonymousId ?? null, url: req.url }));
  site = await new Promise((resolve) => {
    const server = app.listen(0, "127.0.0.1", () => resolve(server));
  });
  origin = `http://localhost:${site.address().port}`;
});

after(async () => {
  if (site) await new Promise((resolve) => site.close(resolve));
  await service?.stop();
});

async function get(url, cookie) {
  const answer = await fetch(url, { redirect: "manual", headers: cookie ? { cookie } : {} });
  const { headers } = answer;
  return { status: answer.status, location: headers.get("location"), cookie: headers.get("set-cookie"), body: await answer.text() };
}

/** The visitor's browser on domain B: the 303 to the clean URL, then the page with the cookie. */
async function land(url) {
  const landing = await get(url);
  assert.equal(landing.status, 303);
  const cookie = landing.cookie.split(";")[0];
  return { location: landing.location, page: JSON.parse((await get(`${origin}${landing.location}`, cookie)).body) };
}

test("payment return URL: a TTL up to the maximum, the provider's own parameter kept", async () => {
  const success = `${origin}/checkout/success?order=1042`;
  await assert.rejects(identity.prepare({ anonymousId: "payer-1", destination: success, ttl: 601 }), (error) => {
    assert.ok(error instanceof InvalidRequest);
    assert.deepEqual(error.errors.map((e) => e.field), ["ttl"]);
    return true;
  });
  const { redirectUrl } = await identity.prepare({ anonymousId: "payer-1", destination: success, ttl: 600 });
  // The provider sends the visitor back to the return URL with its own parameter appended.
  const { location, page } = await land(`${redirectUrl}&payment_id=pi_3Kq`);
  assert.equal(location, "/checkout/success?order=1042&payment_id=pi_3Kq");
  assert.equal(page.anonymousId, "payer-1");
});

test("OAuth round trip: the token in `state`, exchanged once by the callback", async () => {
  const { token } = await identity.prepare({ anonymousId: "signer-1", destination: `${origin}/oauth/callback` });
  // The identity provider signs the visitor in and comes back with a code and the state.
  const callback = `${origin}/oauth/callback?code=abc&state=${encodeURIComponent(token)}`;
  const first = await get(callback);
  assert.deepEqual([first.status, JSON.parse(first.body)], [200, { anonymousId: "signer-1", code: "abc" }]);
  const replayed = await get(callback);
  assert.deepEqual([replayed.status, JSON.parse(replayed.body)], [400, { error: "TokenNotFound" }]);
});

test("mobile app: its backend prepares, the web restores the app's visitor from the link", async () => {
  // The app's backend holds the app's anonymousId and prepares the universal link it opens.
  const destination = `${origin}/account?from=app`;
  const { redirectUrl } = await identity.prepare({ anonymousId: "app-install-7", destination });
  const { location, page } = await land(redirectUrl);
  assert.equal(location, "/account?from=app");
  assert.equal(page.anonymousId, "app-install-7");
});
