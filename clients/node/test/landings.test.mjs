// One landing requested twice at once (a double click, a prefetch and the navigation) is
// exchanged once by handoffMiddleware, against the real service: the exchange is slowed by
// a `fetch` option that waits, then calls the real fetch, so that the landings overlap.
import assert from "node:assert/strict";
import http from "node:http";
import { after, before, describe, test } from "node:test";

import { IdentityClient, handoffMiddleware } from "../dist/esm/index.js";
import { WRITE_KEY, startService } from "./helpers.mjs";

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const SLOW_MS = 300;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let service;

before(async () => {
  service = await startService();
});
after(async () => {
  await service?.stop();
});

/** A client whose exchanges reach the real service SLOW_MS late; `exchanges` counts them. */
function slowClient() {
  const exchanges = [];
  const client = new IdentityClient({
    baseUrl: service.url,
    writeKey: WRITE_KEY,
    fetch: async (url, init) => {
      if (String(url).endsWith("/v1/handoffs/exchange")) {
        exchanges.push(JSON.parse(init.body).token);
        await sleep(SLOW_MS);
      }
      return fetch(url, init);
    },
  });
  return { client, exchanges };
}

/** A node:http site with the middleware; `errors` gets what onError was called with. */
async function startSite(client, options = {}) {
  const errors = [];
  const middleware = handoffMiddleware(client, { secure: false, onError: (error) => errors.push(error), ...options });
  const server = http.createServer((req, res) => middleware(req, res, () => res.end("page")));
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    errors,
    close() {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** A GET (no redirect followed), and its request, to abort it. */
function request(port, path, headers = {}) {
  let req;
  const answer = new Promise((resolve, reject) => {
    req = http.request(
      { host: "127.0.0.1", port, path, headers: { host: `checkout.localhost:${port}`, ...headers } },
      (res) => {
        res.resume();
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers }));
      },
    );
    req.on("error", reject);
    req.end();
  });
  return { req, answer };
}

const get = (port, path, headers) => request(port, path, headers).answer;

/** The visitor cookie values the answer sets. */
function visitorCookies(answer) {
  return (answer.headers["set-cookie"] ?? [])
    .filter((cookie) => cookie.startsWith("ajs_anonymous_id="))
    .map((cookie) => cookie.split(";")[0].slice("ajs_anonymous_id=".length));
}

async function landingPath(client, anonymousId) {
  const url = new URL((await client.prepare({ anonymousId, destination: "http://checkout.localhost/cart?a=1" })).redirectUrl);
  return url.pathname + url.search;
}

describe("a landing requested twice at once", () => {
  test("is exchanged once: every answer sets the handed-off id", async () => {
    const { client, exchanges } = slowClient();
    const site = await startSite(client);
    try {
      const path = await landingPath(client, "twice-node");
      const landed = await Promise.all([get(site.port, path), get(site.port, path), get(site.port, path)]);
      for (const answer of landed) {
        assert.equal(answer.status, 303);
        assert.equal(answer.headers.location, "/cart?a=1");
        assert.deepEqual(visitorCookies(answer), ["twice-node"]);
        assert.ok((answer.headers["set-cookie"] ?? []).some((cookie) => cookie.startsWith("identity_restored=")));
      }
      assert.equal(exchanges.length, 1);
      assert.deepEqual(site.errors, []);
    } finally {
      await site.close();
    }
  });

  test("a visitor with the cookie gets the handed-off id on every answer too", async () => {
    const { client } = slowClient();
    const site = await startSite(client);
    try {
      const path = await landingPath(client, "twice-known");
      const cookie = { cookie: "ajs_anonymous_id=before-the-handoff" };
      const landed = await Promise.all([get(site.port, path, cookie), get(site.port, path, cookie)]);
      for (const answer of landed) assert.deepEqual(visitorCookies(answer), ["twice-known"]);
    } finally {
      await site.close();
    }
  });

  test("nothing is kept once the exchange is over: a later landing finds the token used", async () => {
    const { client, exchanges } = slowClient();
    const site = await startSite(client);
    try {
      const path = await landingPath(client, "once-then-used");
      assert.deepEqual(visitorCookies(await get(site.port, path)), ["once-then-used"]);
      const [later] = visitorCookies(await get(site.port, path));
      assert.match(later, UUID4);
      assert.equal(exchanges.length, 2);
    } finally {
      await site.close();
    }
  });

  test("a landing that went away does not abort the exchange the other waits on", async () => {
    const { client, exchanges } = slowClient();
    const site = await startSite(client);
    try {
      const path = await landingPath(client, "prefetch-cancelled");
      const prefetch = request(site.port, path, { "sec-purpose": "prefetch" });
      prefetch.answer.catch(() => {}); // it is aborted below
      await sleep(SLOW_MS / 6);
      const navigation = get(site.port, path);
      await sleep(SLOW_MS / 6);
      prefetch.req.destroy();
      assert.deepEqual(visitorCookies(await navigation), ["prefetch-cancelled"]);
      assert.equal(exchanges.length, 1);
    } finally {
      await site.close();
    }
  });

  test("a generated id is no one's: bad links landing at once get ids of their own", async () => {
    // Every bad link (an empty, bare or over-long token) is exchanged as the same unknown
    // token: two visitors landing at once on bad links must not share a generated id.
    const { client, exchanges } = slowClient();
    const site = await startSite(client);
    try {
      const paths = ["/cart?handoff_token=", "/cart?handoff_token", `/cart?handoff_token=${"x".repeat(200)}`];
      const landed = await Promise.all([...paths, ...paths].map((path) => get(site.port, path)));
      const ids = landed.map((answer) => visitorCookies(answer));
      for (const found of ids) {
        assert.equal(found.length, 1);
        assert.match(found[0], UUID4);
      }
      assert.equal(new Set(ids.map((found) => found[0])).size, landed.length);
      assert.equal(exchanges.length, landed.length);
    } finally {
      await site.close();
    }
  });

  test("an error of the exchange is every waiting landing's: 303 without a cookie, onError each", async () => {
    const { client, exchanges } = slowClient();
    const site = await startSite(client);
    const down = new IdentityClient({
      baseUrl: service.url,
      writeKey: "not-the-write-key-0123456789",
      fetch: async (url, init) => {
        exchanges.push(JSON.parse(init.body).token);
        await sleep(SLOW_MS);
        return fetch(url, init);
      },
    });
    const refused = await startSite(down);
    try {
      const path = await landingPath(client, "refused-twice");
      const landed = await Promise.all([get(refused.port, path), get(refused.port, path)]);
      for (const answer of landed) {
        assert.equal(answer.status, 303);
        assert.deepEqual(visitorCookies(answer), []);
      }
      assert.equal(exchanges.length, 1);
      assert.equal(refused.errors.length, 2);
      assert.equal(refused.errors[0], refused.errors[1]);
      assert.equal(refused.errors[0].status, 401);
    } finally {
      await refused.close();
      await site.close();
    }
  });
});
