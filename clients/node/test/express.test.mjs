// The README's ten-line Node integration (the `node-domain-a` and `node-domain-b` code blocks),
// run as written in real Express 5 apps, one per domain, against the real service: domain A
// prepares and redirects, domain B's handoffMiddleware restores the visitor.
//
// Each snippet is read from README.md and written, unchanged, to a module inside this package
// (so `@identity-service/client` resolves to this build and `express` to its devDependency),
// followed by one line, `export { app };`, that hands the app to the test, which listens on a
// free loopback port. Only the domain-A snippet's destination host is swapped for this test's
// domain B, since the development source hands off to localhost only (as the Python test does).
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { IdentityClient } from "../dist/esm/index.js";
import { WRITE_KEY, startService } from "./helpers.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const README = path.resolve(here, "..", "..", "..", "README.md");
const SNIPPET = /<!-- ten-lines: ([a-z-]+) -->\n```[a-z]+\n([\s\S]*?)```/g;
const DOCUMENTED_CART = "https://checkout.example-pay.com";

let service;
let snippetDir;
let shop;
let checkout;

/** The README's ten-line snippets, by name. */
function snippets() {
  return Object.fromEntries([...readFileSync(README, "utf8").matchAll(SNIPPET)].map((m) => [m[1], m[2]]));
}

/** Imports `code` as a module of this package and returns its `app`. */
async function run(name, code) {
  const file = path.join(snippetDir, `${name}.mjs`);
  writeFileSync(file, `${code}\nexport { app };\n`);
  return (await import(pathToFileURL(file).href)).app;
}

function listen(app) {
  return new Promise((resolve) => {
    const server = app.listen(0, "127.0.0.1", () => resolve(server));
  });
}
const originOf = (server) => `http://localhost:${server.address().port}`;
const close = (server) => new Promise((resolve) => server.close(resolve));

before(async () => {
  service = await startService();
  // The snippets' `new IdentityClient()` reads these.
  process.env.IDENTITY_URL = service.url;
  process.env.IDENTITY_WRITE_KEY = WRITE_KEY;
  snippetDir = mkdtempSync(path.join(here, ".snippets-"));
  const code = snippets();
  const domainB = await run("node-domain-b", code["node-domain-b"]);
  domainB.get("/me", (req, res) => res.json(req.identity ?? null)); // what the handler gets
  checkout = await listen(domainB);
  assert.ok(code["node-domain-a"].includes(`"${DOCUMENTED_CART}/cart"`));
  shop = await listen(await run("node-domain-a", code["node-domain-a"].replace(DOCUMENTED_CART, originOf(checkout))));
});

after(async () => {
  if (shop) await close(shop);
  if (checkout) await close(checkout);
  if (snippetDir) rmSync(snippetDir, { recursive: true, force: true });
  await service?.stop();
});

/** One request, no redirect followed. */
async function get(url, cookie, method = "GET") {
  const answer = await fetch(url, { method, redirect: "manual", headers: cookie ? { cookie } : {} });
  return { status: answer.status, headers: answer.headers, body: await answer.text() };
}

/** Domain B's answer to the handoff URL: 303 to the clean URL with the visitor cookie. */
async function land(redirectUrl) {
  const landing = await get(redirectUrl);
  assert.equal(landing.status, 303);
  assert.equal(landing.headers.get("location"), "/cart");
  assert.equal(landing.headers.get("cache-control"), "no-store");
  const [setCookie, carry] = landing.headers.getSetCookie();
  assert.match(setCookie, /^ajs_anonymous_id=[^;]+; Path=\/; Max-Age=31536000; Expires=[^;]+; SameSite=Lax; Secure$/);
  assert.match(carry, /^identity_restored=[\w-]+\.[\w-]+; Path=\/; Max-Age=60; Expires=[^;]+; SameSite=Lax; Secure; HttpOnly$/);
  // fetch keeps no cookie jar: send them back as a browser on https would.
  const cookie = setCookie.split(";")[0];
  const page = await get(`${originOf(checkout)}${landing.headers.get("location")}`, `${cookie}; ${carry.split(";")[0]}`);
  assert.equal(page.status, 200);
  assert.match(page.headers.getSetCookie()[0], /^identity_restored=; Path=\/; Max-Age=0;/);
  return { cookie, body: page.body };
}

test("the snippets are the README's, about ten lines each", () => {
  const code = snippets();
  for (const name of ["node-domain-a", "node-domain-b"]) {
    assert.ok(code[name], name);
    assert.ok(code[name].split("\n").filter((line) => line.trim()).length <= 15, name);
  }
});

test("the shop's visitor arrives at the checkout with the same anonymousId", async () => {
  const go = await get(`${originOf(shop)}/checkout`, "ajs_anonymous_id=visitor-express", "POST");
  assert.equal(go.status, 303);
  const redirectUrl = go.headers.get("location");
  assert.ok(redirectUrl.startsWith(`${originOf(checkout)}/cart?handoff_token=`));

  const { cookie, body } = await land(redirectUrl);
  assert.equal(cookie, "ajs_anonymous_id=visitor-express");
  assert.equal(body, "hello visitor-express");

  // The same link again (a used token): a generated id, and the page still loads.
  const again = await land(redirectUrl);
  assert.notEqual(again.cookie, cookie);
  assert.equal(again.body, `hello ${again.cookie.split("=")[1]}`);
});

test("an unknown token falls back and a page without a token passes through", async () => {
  const landed = await land(`${originOf(checkout)}/cart?handoff_token=no-such-token`);
  assert.match(landed.body, /^hello [0-9a-f-]{36}$/);
  const plain = await get(`${originOf(checkout)}/cart`);
  assert.deepEqual([plain.status, plain.body], [200, "hello new visitor"]);
});

test("a shop visitor without a cookie still goes to the checkout, undecorated", async () => {
  // No ajs_anonymous_id (analytics.js blocked): the prepare is refused, the checkout goes on.
  const go = await get(`${originOf(shop)}/checkout`, undefined, "POST");
  assert.deepEqual([go.status, go.headers.get("location")], [303, `${originOf(checkout)}/cart`]);
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
