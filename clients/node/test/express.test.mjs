// The documented ten-line integration in real Express 5 apps, one per domain, against the real
// service: domain A prepares and redirects, domain B's handoffMiddleware restores the visitor.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import express from "express";

import { IdentityClient, handoffMiddleware, readCookie } from "../dist/esm/index.js";
import { WRITE_KEY, startService } from "./helpers.mjs";

let service;
let shop;
let checkout;

function listen(app) {
  return new Promise((resolve) => {
    const server = app.listen(0, "127.0.0.1", () => resolve(server));
  });
}
const originOf = (server) => `http://localhost:${server.address().port}`;
const close = (server) => new Promise((resolve) => server.close(resolve));

before(async () => {
  service = await startService();
  const identity = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });

  // Domain B (docs/sdk-node.md), with secure: false since the test serves plain http.
  const b = express();
  b.set("trust proxy", 1);
  b.use(handoffMiddleware(identity, { secure: false, event: "Checkout Started" }));
  b.get("/cart", (req, res) => res.send(`hello ${req.identity?.anonymousId ?? "new visitor"}`));
  b.get("/me", (req, res) => res.json(req.identity ?? null));
  checkout = await listen(b);

  // Domain A (docs/sdk-node.md).
  const a = express();
  const cart = `${originOf(checkout)}/cart?step=1`;
  a.post("/checkout", async (req, res) => {
    try {
      const anonymousId = readCookie(req, "ajs_anonymous_id");
      res.redirect(303, (await identity.prepare({ anonymousId, destination: cart })).redirectUrl);
    } catch {
      res.redirect(303, cart); // no visitor id yet, service down: go anyway, B falls back
    }
  });
  shop = await listen(a);
});

after(async () => {
  if (shop) await close(shop);
  if (checkout) await close(checkout);
  await service?.stop();
});

/** One GET, no redirect followed. */
async function get(url, cookie, method = "GET") {
  const answer = await fetch(url, { method, redirect: "manual", headers: cookie ? { cookie } : {} });
  return { status: answer.status, headers: answer.headers, body: await answer.text() };
}

/** Domain B's answer to the handoff URL: 303 to the clean URL with the visitor cookie. */
async function land(redirectUrl) {
  const landing = await get(redirectUrl);
  assert.equal(landing.status, 303);
  assert.equal(landing.headers.get("location"), "/cart?step=1");
  assert.equal(landing.headers.get("cache-control"), "no-store");
  const [setCookie, carry] = landing.headers.getSetCookie();
  assert.match(setCookie, /^ajs_anonymous_id=[^;]+; Path=\/; Max-Age=31536000; Expires=[^;]+; SameSite=Lax$/);
  assert.match(carry, /^identity_restored=[\w-]+\.[\w-]+; Path=\/; Max-Age=60; Expires=[^;]+; SameSite=Lax; HttpOnly$/);
  const cookie = setCookie.split(";")[0];
  const page = await get(`${originOf(checkout)}${landing.headers.get("location")}`, `${cookie}; ${carry.split(";")[0]}`);
  assert.equal(page.status, 200);
  assert.match(page.headers.getSetCookie()[0], /^identity_restored=; Path=\/; Max-Age=0;/);
  return { cookie, body: page.body };
}

test("the shop's visitor arrives at the checkout with the same anonymousId", async () => {
  const go = await get(`${originOf(shop)}/checkout`, "ajs_anonymous_id=visitor-express", "POST");
  assert.equal(go.status, 303);
  const redirectUrl = go.headers.get("location");
  assert.ok(redirectUrl.startsWith(`${originOf(checkout)}/cart?step=1&handoff_token=`));

  const { cookie, body } = await land(redirectUrl);
  assert.equal(cookie, "ajs_anonymous_id=visitor-express");
  assert.equal(body, "hello visitor-express");

  // The same link again (a used token): a generated id, and the page still loads.
  const again = await land(redirectUrl);
  assert.notEqual(again.cookie, cookie);
  assert.equal(again.body, `hello ${again.cookie.split("=")[1]}`);
});

test("an unknown token falls back and a page without a token passes through", async () => {
  const landed = await land(`${originOf(checkout)}/cart?step=1&handoff_token=no-such-token`);
  assert.match(landed.body, /^hello [0-9a-f-]{36}$/);
  const plain = await get(`${originOf(checkout)}/cart`);
  assert.deepEqual([plain.status, plain.body], [200, "hello new visitor"]);
});

test("a shop visitor without a cookie still goes to the checkout, undecorated", async () => {
  // No ajs_anonymous_id (analytics.js blocked): the prepare is refused, the checkout goes on.
  const go = await get(`${originOf(shop)}/checkout`, undefined, "POST");
  assert.deepEqual([go.status, go.headers.get("location")], [303, `${originOf(checkout)}/cart?step=1`]);
});

test("the Express handler after the 303 sees the restored identity, once", async () => {
  const identity = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
  const handoff = await identity.prepare({
    anonymousId: "visitor-me",
    userId: "user-me",
    traits: { plan: "pro" },
    consent: { analytics: true },
    destination: `${originOf(checkout)}/me`,
  });
  const landing = await get(handoff.redirectUrl);
  assert.equal(landing.status, 303);
  const cookies = landing.headers.getSetCookie().map((c) => c.split(";")[0]).join("; ");
  const page = await get(`${originOf(checkout)}/me`, cookies);
  assert.deepEqual(JSON.parse(page.body), {
    anonymousId: "visitor-me",
    source: "handoff",
    userId: "user-me",
    traits: { plan: "pro" },
    consent: { analytics: true },
  });
  const later = await get(`${originOf(checkout)}/me`, "ajs_anonymous_id=visitor-me");
  assert.deepEqual(JSON.parse(later.body), { anonymousId: "visitor-me", source: "cookie" });
});
