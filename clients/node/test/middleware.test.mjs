// The domain-B middleware in a plain node:http server (no express), against the real service.
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import http from "node:http";
import { after, before, describe, test } from "node:test";

import { encodeCarry, carryKey } from "../dist/esm/carry.js";
import { ConfigurationError, IdentityClient, ServiceUnavailable, handoffMiddleware } from "../dist/esm/index.js";
import { WRITE_KEY, freePort, startService } from "./helpers.mjs";

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
let service;

before(async () => {
  service = await startService();
});
after(async () => {
  await service?.stop();
});

/**
 * A node:http "checkout" whose pages answer 200 with what the handler saw in req.identity;
 * `landed` gets the req.identity of each request the middleware answered 303 (no handler).
 */
async function startCheckout(client, options = {}) {
  const errors = [];
  const landed = [];
  const middleware = handoffMiddleware(client, { onError: (error) => errors.push(error), ...options });
  const server = http.createServer((req, res) => {
    res.on("finish", () => {
      if (res.statusCode === 303) landed.push(req.identity ?? null);
    });
    middleware(req, res, (error) => {
      res.writeHead(error ? 500 : 200, { "content-type": "application/json" });
      res.end(JSON.stringify({ page: req.url, identity: req.identity ?? null }));
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    port,
    origin: `http://checkout.localhost:${port}`,
    errors,
    landed,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** GET through 127.0.0.1 with `Host: checkout.localhost:<port>`; no redirect is followed. */
function get(port, path, headers = {}, method = "GET") {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: "127.0.0.1", port, path, method, headers: { host: `checkout.localhost:${port}`, ...headers } },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => (body += chunk));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body }));
      },
    );
    req.on("error", reject);
    req.end();
  });
}

/** The one `Set-Cookie` of cookie `wanted` in the answer. */
function cookieOf(answer, wanted = "ajs_anonymous_id") {
  const cookies = (answer.headers["set-cookie"] ?? []).filter((c) => c.startsWith(`${wanted}=`));
  assert.equal(cookies.length, 1, JSON.stringify(answer.headers["set-cookie"]));
  const [pair, ...attributes] = cookies[0].split("; ");
  const eq = pair.indexOf("=");
  return { name: pair.slice(0, eq), value: pair.slice(eq + 1), attributes };
}

const CARRY = "identity_restored";

/** `payload` base64url-encoded and signed with the carry key of WRITE_KEY, whatever it holds. */
function signed(payload) {
  const text = Buffer.from(payload, "utf8").toString("base64url");
  return `${text}.${createHmac("sha256", carryKey(WRITE_KEY)).update(text).digest("base64url")}`;
}

/** The request after the 303, with the cookies the 303 set: what the handler saw, and the answer. */
async function follow(checkout, answer) {
  const cookie = (answer.headers["set-cookie"] ?? []).map((c) => c.split(";")[0]).join("; ");
  const page = await get(checkout.port, answer.headers.location, { cookie });
  return { page, identity: JSON.parse(page.body).identity };
}

async function waitForEvent(predicate) {
  const deadline = Date.now() + 5000;
  for (;;) {
    const found = service.events().find(predicate);
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`no such event in ${JSON.stringify(service.events())}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("handoffMiddleware", () => {
  let client;
  let checkout;
  before(async () => {
    client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    checkout = await startCheckout(client, { cookieDomain: "checkout.localhost", event: "Checkout Started" });
  });
  after(async () => {
    await checkout.close();
  });

  test("a token: 303 to the clean URL with the visitor cookie; domain B's context sent", async () => {
    const handoff = await client.prepare({
      anonymousId: "visitor-from-shop",
      userId: "user-42",
      traits: { plan: "pro", name: "Zoë" },
      consent: { analytics: true, ads: false },
      destination: `${checkout.origin}/cart?step=1&coupon=x`,
    });
    const landing = new URL(handoff.redirectUrl);
    const answer = await get(checkout.port, landing.pathname + landing.search, {
      referer: "http://shop.localhost/basket",
      "user-agent": "node-test-agent/1.0",
    });
    assert.equal(answer.status, 303);
    assert.equal(answer.headers.location, "/cart?step=1&coupon=x");
    assert.equal(answer.headers["cache-control"], "no-store");
    // No Referrer-Policy: the 303's own URL (with the token) is never a referrer, and
    // no-referrer would take the landing page's referrer (the shop) away.
    assert.equal(answer.headers["referrer-policy"], undefined);
    const cookie = cookieOf(answer);
    assert.equal(cookie.name, "ajs_anonymous_id");
    assert.equal(cookie.value, "visitor-from-shop");
    assert.ok(cookie.attributes.includes("Domain=checkout.localhost"));
    assert.ok(cookie.attributes.includes("Path=/"));
    assert.ok(cookie.attributes.includes("Max-Age=31536000"));
    assert.ok(cookie.attributes.includes("SameSite=Lax"));
    assert.ok(cookie.attributes.includes("Secure"));
    assert.ok(cookie.attributes.some((a) => a.startsWith("Expires=")));
    assert.deepEqual(checkout.errors, []);

    const track = await waitForEvent((e) => e.type === "track" && e.anonymousId === "visitor-from-shop" && e.event === "Checkout Started");
    assert.equal(track.context.page.url, `${checkout.origin}/cart?step=1&coupon=x`);
    assert.equal(track.context.page.referrer, "http://shop.localhost/basket");
    assert.equal(track.context.ip, "127.0.0.1");
    assert.equal(track.context.userAgent, "node-test-agent/1.0");

    // The carry cookie is host-only (no Domain): userId and traits stay on this host.
    const carry = cookieOf(answer, CARRY);
    assert.deepEqual(
      carry.attributes.filter((a) => !a.startsWith("Expires=")),
      ["Path=/", "Max-Age=60", "SameSite=Lax", "Secure", "HttpOnly"],
    );

    // The page the 303 leads to: its handler sees the whole restored identity, once.
    const { page, identity } = await follow(checkout, answer);
    assert.equal(page.status, 200);
    assert.deepEqual(identity, {
      anonymousId: "visitor-from-shop",
      source: "handoff",
      userId: "user-42",
      traits: { plan: "pro", name: "Zoë" },
      consent: { analytics: true, ads: false },
    });
    const cleared = cookieOf(page, CARRY);
    assert.equal(cleared.value, "");
    assert.deepEqual(
      cleared.attributes.filter((a) => !a.startsWith("Expires=")),
      ["Path=/", "Max-Age=0", "SameSite=Lax", "Secure", "HttpOnly"],
    );

    // Later requests carry the visitor cookie only: the handler sees the visitor.
    const later = await get(checkout.port, "/cart?step=1&coupon=x", { cookie: `other=1; ${cookie.name}=${cookie.value}` });
    assert.equal(later.status, 200);
    assert.equal(later.headers["set-cookie"], undefined);
    assert.deepEqual(JSON.parse(later.body).identity, { anonymousId: "visitor-from-shop", source: "cookie" });
  });

  test("a forged, expired, foreign, malformed or oversized carry cookie is ignored, and cleared", async () => {
    const handoff = await client.prepare({ anonymousId: "carried", userId: "user-1", destination: `${checkout.origin}/cart` });
    const answer = await get(checkout.port, `/cart?handoff_token=${handoff.token}`);
    const { value } = cookieOf(answer, CARRY);
    const [payload, signature] = value.split(".");
    const raised = Buffer.from(
      Buffer.from(payload, "base64url").toString().replace('"userId":"user-1"', '"userId":"admin"'),
    ).toString("base64url");
    assert.notEqual(raised, payload);
    const admin = { anonymousId: "carried", userId: "admin", traits: {}, consent: {}, source: "handoff" };
    const otherKey = encodeCarry(admin, carryKey("not-the-write-key"), 2 ** 40);
    const expired = encodeCarry(admin, carryKey(WRITE_KEY), Math.floor(Date.now() / 1000) - 1);
    for (const cookie of [
      `ajs_anonymous_id=carried; ${CARRY}=${raised}.${signature}`,
      `ajs_anonymous_id=carried; ${CARRY}=${otherKey}`,
      `ajs_anonymous_id=carried; ${CARRY}=${expired}`,
      `ajs_anonymous_id=someone-else; ${CARRY}=${value}`,
      `ajs_anonymous_id=carried; ${CARRY}=${value.slice(0, -2)}`,
      `ajs_anonymous_id=carried; ${CARRY}=bm90IGpzb24.x`,
      // Signed with the real key, so only the decoder's JSON and field checks refuse them.
      `ajs_anonymous_id=carried; ${CARRY}=${signed("not json")}`,
      `ajs_anonymous_id=carried; ${CARRY}=${signed("[]")}`,
      `ajs_anonymous_id=carried; ${CARRY}=${signed('{"anonymousId":"carried"}')}`,
      `ajs_anonymous_id=carried; ${CARRY}=${"A".repeat(5000)}`,
    ]) {
      const page = await get(checkout.port, "/cart", { cookie });
      assert.equal(page.status, 200, cookie);
      const visitor = cookie.split(";")[0].split("=")[1];
      assert.deepEqual(JSON.parse(page.body).identity, { anonymousId: visitor, source: "cookie" }, cookie);
      assert.equal(cookieOf(page, CARRY).value, "");
    }
    const genuine = await get(checkout.port, "/cart", { cookie: `ajs_anonymous_id=carried; ${CARRY}=${value}` });
    assert.equal(JSON.parse(genuine.body).identity.userId, "user-1");
  });

  test("an empty, bare or over-long token: the fallback's generated id, not an error", async () => {
    // A bare `?handoff_token` (no `=`) is a present but empty token, as in the Python SDK.
    for (const token of ["handoff_token=", "handoff_token", "handoff%5Ftoken=", `handoff_token=${"t".repeat(129)}`]) {
      const answer = await get(checkout.port, `/pay?${token}&a=1`);
      assert.equal(answer.status, 303);
      assert.equal(answer.headers.location, "/pay?a=1");
      const { value } = cookieOf(answer);
      assert.match(value, UUID4);
      const { identity } = await follow(checkout, answer);
      assert.deepEqual(identity, { anonymousId: value, source: "generated", userId: null, traits: {}, consent: {} });
    }
    assert.deepEqual(checkout.errors, []);
  });

  test("an anonymousId with `%` comes back as it was (the cookie escapes it)", async () => {
    const handoff = await client.prepare({ anonymousId: "a%41b", userId: "user-pct", destination: `${checkout.origin}/cart` });
    const answer = await get(checkout.port, `/cart?handoff_token=${handoff.token}`);
    assert.equal(cookieOf(answer).value, "a%2541b");
    const { identity } = await follow(checkout, answer);
    assert.equal(identity.anonymousId, "a%41b");
    assert.equal(identity.source, "handoff"); // the carry cookie is the visitor's
    assert.equal(identity.userId, "user-pct");
  });

  test("traits too large for the carry cookie are left out; an identity too large even without them is not carried", async () => {
    const warnings = [];
    const onWarning = (warning) => warnings.push(warning);
    process.on("warning", onWarning);
    try {
      const traits = await client.prepare({
        anonymousId: "visitor-traits",
        userId: "user-traits",
        traits: { bio: "x".repeat(1000) },
        consent: { analytics: true },
        destination: `${checkout.origin}/cart`,
      });
      const answer = await get(checkout.port, `/cart?handoff_token=${traits.token}`);
      assert.ok(cookieOf(answer, CARRY).value.length <= 1500);
      const { identity } = await follow(checkout, answer);
      assert.deepEqual(identity, {
        anonymousId: "visitor-traits",
        source: "handoff",
        userId: "user-traits",
        traits: {},
        consent: { analytics: true },
      });

      const consent = Object.fromEntries(Array.from({ length: 40 }, (_, n) => [`category-${n}-${"c".repeat(28)}`, true]));
      const large = await client.prepare({ anonymousId: "visitor-large", userId: "user-large", consent, destination: `${checkout.origin}/cart` });
      const tooLarge = await get(checkout.port, `/cart?handoff_token=${large.token}`);
      assert.equal(cookieOf(tooLarge).value, "visitor-large");
      assert.equal((tooLarge.headers["set-cookie"] ?? []).length, 1);
      await new Promise((resolve) => setImmediate(resolve)); // warnings are emitted on the next tick
      assert.deepEqual(warnings.map((w) => w.code), ["IDENTITY_CARRY_TOO_LARGE", "IDENTITY_CARRY_TOO_LARGE"]);
      for (const warning of warnings) assert.doesNotMatch(warning.message, /visitor-|user-/);
    } finally {
      process.off("warning", onWarning);
    }
  });

  test("a used token: a generated anonymousId in the cookie, same clean redirect", async () => {
    const handoff = await client.prepare({ anonymousId: "used-visitor", destination: `${checkout.origin}/pay` });
    await client.exchange(handoff.token);
    const answer = await get(checkout.port, `/pay?handoff_token=${handoff.token}`);
    assert.equal(answer.status, 303);
    assert.equal(answer.headers.location, "/pay");
    assert.match(cookieOf(answer).value, UUID4);
  });

  test("an expired token: a generated anonymousId", async () => {
    const handoff = await client.prepare({ anonymousId: "late-visitor", destination: `${checkout.origin}/pay`, ttl: 1 });
    await new Promise((r) => setTimeout(r, 1500));
    const answer = await get(checkout.port, `/pay?a=1&handoff_token=${handoff.token}`);
    assert.equal(answer.status, 303);
    assert.equal(answer.headers.location, "/pay?a=1");
    const { value } = cookieOf(answer);
    assert.match(value, UUID4);
    assert.notEqual(value, "late-visitor");
    const { identity } = await follow(checkout, answer);
    assert.deepEqual(identity, { anonymousId: value, source: "generated", userId: null, traits: {}, consent: {} });
  });

  test("the other parameters stay as sent; the redirect never leaves the site", async () => {
    const handoff = await client.prepare({ anonymousId: "query-visitor", destination: `${checkout.origin}/cart` });
    const answer = await get(checkout.port, `/cart?q=a%20b+c&handoff_token=${handoff.token}&x=%7E&empty=`);
    assert.equal(answer.status, 303);
    assert.equal(answer.headers.location, "/cart?q=a%20b+c&x=%7E&empty=");
    assert.equal(cookieOf(answer).value, "query-visitor");
    const sneaky = await get(checkout.port, `//evil.example/x?handoff_token=${"e".repeat(43)}`);
    assert.equal(sneaky.status, 303);
    assert.equal(sneaky.headers.location, "/evil.example/x");
  });

  test("a used token does not overwrite a visitor cookie already there", async () => {
    const answer = await get(checkout.port, `/pay?handoff_token=${"u".repeat(43)}`, { cookie: "ajs_anonymous_id=known-visitor" });
    assert.equal(answer.status, 303);
    assert.equal(answer.headers.location, "/pay");
    assert.equal(answer.headers["set-cookie"], undefined);
  });

  test("a handoff prepared with a userId alone: the 303 without a cookie, req.identity with the userId", async () => {
    // The service answers it with `anonymousId: null`: nothing for the visitor cookie, nor
    // for the carry cookie (read for the visitor cookie's anonymousId), as in the Python SDK.
    for (const visitor of [undefined, "known-visitor"]) {
      const handoff = await client.prepare({
        userId: "user-only",
        traits: { plan: "pro" },
        destination: `${checkout.origin}/cart?a=1`,
      });
      const headers = visitor ? { cookie: `ajs_anonymous_id=${visitor}` } : {};
      const answer = await get(checkout.port, `/cart?a=1&handoff_token=${handoff.token}`, headers);
      assert.equal(answer.status, 303);
      assert.equal(answer.headers.location, "/cart?a=1");
      assert.equal(answer.headers["set-cookie"], undefined, visitor);
      assert.deepEqual(checkout.errors, []);
      const { exchanged, ...identity } = checkout.landed.at(-1);
      assert.deepEqual(identity, {
        anonymousId: null,
        source: "handoff",
        userId: "user-only",
        traits: { plan: "pro" },
        consent: {},
      });
      assert.equal(exchanged.anonymousId, null);
      assert.equal(exchanged.userId, "user-only");
      // The page after the 303: the visitor cookie's identity, if any, as before.
      const page = await get(checkout.port, answer.headers.location, headers);
      assert.equal(page.status, 200);
      assert.deepEqual(JSON.parse(page.body).identity, visitor ? { anonymousId: visitor, source: "cookie" } : null);
    }
  });

  test("no token: the request passes, with req.identity from the cookie if any", async () => {
    const bare = await get(checkout.port, "/cart?step=2");
    assert.equal(bare.status, 200);
    assert.deepEqual(JSON.parse(bare.body), { page: "/cart?step=2", identity: null });
    const classic = await get(checkout.port, "/cart", { cookie: "ajs_anonymous_id=%22classic-id%22" });
    assert.equal(JSON.parse(classic.body).identity.anonymousId, "classic-id");
    // Not a GET: passes too (a form post must not be swallowed).
    const post = await get(checkout.port, `/pay?handoff_token=${"p".repeat(43)}`, {}, "POST");
    assert.equal(post.status, 200);
  });
});

describe("handoffMiddleware when the service is out", () => {
  test("a 503: 303 to the clean URL, no cookie, the error reported", async () => {
    const redisPort = await freePort();
    const down = await startService({ IDENTITY_REDIS_URL: `redis://127.0.0.1:${redisPort}`, IDENTITY_SECRET: "s".repeat(40) });
    const client = new IdentityClient({ baseUrl: down.url, writeKey: WRITE_KEY });
    const checkout = await startCheckout(client, { secure: false });
    try {
      const answer = await get(checkout.port, `/cart?step=1&handoff_token=${"t".repeat(43)}`);
      assert.equal(answer.status, 303);
      assert.equal(answer.headers.location, "/cart?step=1");
      assert.equal(answer.headers["set-cookie"], undefined);
      assert.equal(checkout.errors.length, 1);
      assert.ok(checkout.errors[0] instanceof ServiceUnavailable);
    } finally {
      await checkout.close();
      await down.stop();
    }
  });

  test("nothing listening: the same clean redirect", async () => {
    const client = new IdentityClient({ baseUrl: `http://127.0.0.1:${await freePort()}`, writeKey: WRITE_KEY, timeoutMs: 500 });
    const checkout = await startCheckout(client);
    try {
      const answer = await get(checkout.port, `/?handoff_token=${"t".repeat(43)}`);
      assert.equal(answer.status, 303);
      assert.equal(answer.headers.location, "/");
      assert.equal(answer.headers["set-cookie"], undefined);
      assert.equal(checkout.errors[0].name, "IdentityConnectionError");
    } finally {
      await checkout.close();
    }
  });
});

describe("handoffMiddleware's cookieDomain", () => {
  const client = new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey: WRITE_KEY });
  // Each went into every Set-Cookie as written: a ';' added attributes, a space or an empty
  // label made a cookie the browser drops (the visitor never restored).
  const INVALID = [
    "example.test; HttpOnly",
    "example.test,other.test",
    "example .test",
    "example.test\r\nSet-Cookie: x=1",
    "example.test\u0000",
    "example..test",
    "example.test.",
    ".",
    "..example.test",
    "-example.test",
    "exa$mple.test",
    "bücher.example",
    `${"a".repeat(64)}.test`,
    `${`${"a".repeat(60)}.`.repeat(5)}test`,
    5,
    // Browsers set no Domain cookie for a single label or an IP address: the visitor
    // cookie was never set (the service's AMP cookie.domain refuses them too).
    "localhost",
    ".com",
    "com",
    "127.0.0.1",
    ".127.0.0.1",
    "shop.0x7f",
    "[::1]",
    "::1",
  ];
  for (const cookieDomain of INVALID) {
    test(`${JSON.stringify(cookieDomain).slice(0, 40)} is a ConfigurationError when the middleware is made`, () => {
      assert.throws(() => handoffMiddleware(client, { cookieDomain }), (error) => {
        assert.ok(error instanceof ConfigurationError);
        assert.match(error.message, /cookieDomain/);
        return true;
      });
    });
  }

  for (const cookieDomain of [".example-pay.com", "checkout.localhost", "10.localhost", "xn--bcher-kva.example"]) {
    test(`${cookieDomain} is written as given`, async () => {
      const real = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
      const checkout = await startCheckout(real, { cookieDomain });
      try {
        const handoff = await real.prepare({ anonymousId: "visitor-domain", destination: `${checkout.origin}/cart` });
        const landing = new URL(handoff.redirectUrl);
        const answer = await get(checkout.port, landing.pathname + landing.search);
        assert.equal(answer.status, 303);
        assert.ok(cookieOf(answer).attributes.includes(`Domain=${cookieDomain}`));
      } finally {
        await checkout.close();
      }
    });
  }
});

describe("handoffMiddleware's other cookie options", () => {
  const client = new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey: WRITE_KEY });
  // Each went into every Set-Cookie as written (`Max-Age=NaN`, `Path=/; Domain=...`) or made
  // a cookie the browser drops, or one Node refuses to send (a CR/LF: the request's error);
  // the same as the Python SDK refuses.
  const NAMES = ["", "ajs; Domain=evil.test", "ajs,other", "ajs id", "ajs=id", 'ajs"', "ajs\r\nSet-Cookie: x=1", "ajs\u0000", "ajs\u007f", "ajs_é", 5];
  const INVALID = [
    ...["cookieName", "carryCookieName"].flatMap((option) => NAMES.map((name) => ({ [option]: name }))),
    { cookiePath: "/; Domain=evil.test" },
    { cookiePath: "/shop\r\nSet-Cookie: x=1" },
    { cookiePath: "/shop\u0000" },
    { cookiePath: "/shöp" },
    { cookiePath: "" },
    { cookiePath: "shop" },
    { cookieMaxAge: Number.NaN },
    { cookieMaxAge: Number.POSITIVE_INFINITY },
    { cookieMaxAge: -1 },
    { cookieMaxAge: 0 },
    { cookieMaxAge: 1.5 },
    { cookieMaxAge: 400 * 24 * 3600 + 1 },
    { cookieMaxAge: "3600" },
    { sameSite: "Lax; Domain=evil.test" },
    { sameSite: "" },
    { sameSite: "None", secure: false },
    // One name for both cookies: the carry cookie (HttpOnly, 60 s) replaced the visitor's.
    { cookieName: "identity_restored" },
    { carryCookieName: "ajs_anonymous_id" },
    // A name's prefix its attributes do not fit (RFC 6265bis 4.1.3, in any case): browsers
    // drop the cookie. __Secure- needs Secure; __Host- Secure, Path=/ and no Domain (the
    // carry cookie never has one).
    { cookieName: "__Secure-ajs", secure: false },
    { cookieName: "__secure-ajs", secure: false },
    { cookieName: "__Host-ajs", secure: false },
    { cookieName: "__Host-ajs", cookieDomain: ".example-pay.com" },
    { cookieName: "__HOST-ajs", cookiePath: "/shop" },
    { carryCookieName: "__Secure-restored", secure: false },
    { carryCookieName: "__Host-restored", cookiePath: "/shop" },
  ];
  for (const options of INVALID) {
    const [name] = Object.keys(options);
    test(`${JSON.stringify(options).slice(0, 60)} is a ConfigurationError when the middleware is made`, () => {
      assert.throws(() => handoffMiddleware(client, options), (error) => {
        assert.ok(error instanceof ConfigurationError);
        assert.match(error.message, new RegExp(name));
        return true;
      });
    });
  }

  test("valid ones are written as given", async () => {
    const real = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    const cookieName = "__Secure-ajs_id!#$%&'*+-.^`|~";
    const checkout = await startCheckout(real, {
      cookieName,
      carryCookieName: "restored.1",
      cookiePath: '/shop/a,="x',
      cookieMaxAge: 400 * 24 * 3600,
      sameSite: "none",
    });
    try {
      const handoff = await real.prepare({ anonymousId: "visitor-options", destination: `${checkout.origin}/cart` });
      const landing = new URL(handoff.redirectUrl);
      const answer = await get(checkout.port, landing.pathname + landing.search);
      assert.equal(answer.status, 303);
      const cookie = cookieOf(answer, cookieName);
      assert.equal(cookie.value, "visitor-options");
      assert.deepEqual(
        cookie.attributes.filter((attribute) => !attribute.startsWith("Expires=")),
        ['Path=/shop/a,="x', "Max-Age=34560000", "SameSite=none", "Secure"],
      );
      cookieOf(answer, "restored.1");
    } finally {
      await checkout.close();
    }
  });
});

describe("handoffMiddleware's sameSite and the carry cookie", () => {
  // The request after the landing's 303 is the tail of a navigation from domain A: a browser
  // sends no Strict cookie with it, so the carry cookie is Lax then, and is read without the
  // visitor cookie (withheld as well). The visitor cookie keeps the site's SameSite; the carry
  // cookie is cleared with the attributes it was set with. Without a Strict visitor cookie, a
  // carry cookie without the visitor cookie is still ignored. As in the Python SDK.
  const CASES = [
    ["Lax", "Lax"],
    ["Strict", "Lax"],
    ["strict", "Lax"],
    ["None", "None"],
  ];
  const withoutExpires = (attributes) => attributes.filter((a) => !a.startsWith("Expires="));
  for (const [sameSite, carrySameSite] of CASES) {
    test(`sameSite ${sameSite}: the carry cookie is SameSite=${carrySameSite}`, async () => {
      const client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
      const checkout = await startCheckout(client, { sameSite, cookieDomain: "checkout.localhost" });
      try {
        const handoff = await client.prepare({ anonymousId: "visitor-ss", destination: `${checkout.origin}/cart` });
        const answer = await get(checkout.port, `/cart?handoff_token=${handoff.token}`);
        assert.equal(answer.status, 303);
        assert.ok(cookieOf(answer).attributes.includes(`SameSite=${sameSite}`));
        const carry = cookieOf(answer, CARRY);
        assert.deepEqual(withoutExpires(carry.attributes), ["Path=/", "Max-Age=60", `SameSite=${carrySameSite}`, "Secure", "HttpOnly"]);

        // What a browser sends after the 303 when the visitor cookie is withheld.
        const page = await get(checkout.port, "/cart", { cookie: `${CARRY}=${carry.value}` });
        const strict = sameSite.toLowerCase() === "strict";
        const { identity } = JSON.parse(page.body);
        assert.deepEqual(identity && [identity.anonymousId, identity.source], strict ? ["visitor-ss", "handoff"] : null);
        const cleared = cookieOf(page, CARRY);
        assert.equal(cleared.value, "");
        assert.deepEqual(
          withoutExpires(cleared.attributes),
          withoutExpires(carry.attributes).map((a) => (a === "Max-Age=60" ? "Max-Age=0" : a)),
        );
      } finally {
        await checkout.close();
      }
    });
  }
});

describe("handoffMiddleware's prefixed cookie names", () => {
  test("are written when their attributes fit: __Host- for both cookies, Secure, Path=/, no Domain", async () => {
    const real = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    const checkout = await startCheckout(real, { cookieName: "__Host-ajs", carryCookieName: "__Host-restored" });
    try {
      const handoff = await real.prepare({ anonymousId: "visitor-prefix", destination: `${checkout.origin}/cart` });
      const landing = new URL(handoff.redirectUrl);
      const answer = await get(checkout.port, landing.pathname + landing.search);
      assert.equal(answer.status, 303);
      const cookie = cookieOf(answer, "__Host-ajs");
      assert.equal(cookie.value, "visitor-prefix");
      assert.ok(cookie.attributes.includes("Path=/") && cookie.attributes.includes("Secure"), cookie.attributes);
      assert.ok(!cookie.attributes.some((attribute) => attribute.startsWith("Domain=")), cookie.attributes);
      cookieOf(answer, "__Host-restored");
    } finally {
      await checkout.close();
    }
    // A host-only carry cookie beside a visitor cookie for the parent domain.
    handoffMiddleware(real, { cookieName: "__Secure-ajs", carryCookieName: "__Host-restored", cookieDomain: ".example-pay.com" });
  });
});

describe("handoffMiddleware's tokenParam", () => {
  const client = new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey: WRITE_KEY });
  // An empty one made any URL with an empty query part (`?a&&b`) a handoff: exchanged,
  // answered 303, a generated id set. The service's IDENTITY_TOKEN_PARAM is ASCII letters,
  // digits, '_' or '-'; so is the middleware's, as the Python SDK's.
  for (const tokenParam of ["", "handoff token", "t\u00f6ken", "a=b", "a&b", "a.b", 5]) {
    test(`${JSON.stringify(tokenParam)} is a ConfigurationError when the middleware is made`, () => {
      assert.throws(() => handoffMiddleware(client, { tokenParam }), (error) => {
        assert.ok(error instanceof ConfigurationError);
        assert.match(error.message, /tokenParam/);
        return true;
      });
    });
  }
});

describe("handoffMiddleware's publicOrigin", () => {
  const client = new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey: WRITE_KEY });
  // Each but ftp:// made every handoff request go on to the handler untouched: the token
  // never exchanged and left in the address bar (ftp://, a page URL of another scheme).
  for (const publicOrigin of ["checkout.example-pay.com", "ftp://checkout.example-pay.com", "https://", "/cart"]) {
    test(`${publicOrigin} is a ConfigurationError when the middleware is made`, () => {
      assert.throws(() => handoffMiddleware(client, { publicOrigin }), (error) => {
        assert.ok(error instanceof ConfigurationError);
        assert.match(error.message, /publicOrigin/);
        return true;
      });
    });
  }

  // Anything but an origin: user information went, as given, into the page URL sent with
  // every exchange; a path, a query or a fragment, which no page URL kept, was taken
  // silently. And the value, which may hold credentials, is not quoted (as baseUrl's).
  for (const publicOrigin of [
    "https://user:pw@shop.example-secret.com",
    "https://user@shop.example-secret.com",
    "https://:pw@shop.example-secret.com",
    "https://@shop.example-secret.com",
    "https://shop.example-secret.com/shop",
    "https://shop.example-secret.com?x=1",
    "https://shop.example-secret.com/?",
    "https://shop.example-secret.com#top",
  ]) {
    test(`${publicOrigin} is a ConfigurationError that does not quote it`, () => {
      assert.throws(() => handoffMiddleware(client, { publicOrigin }), (error) => {
        assert.ok(error instanceof ConfigurationError);
        assert.match(error.message, /publicOrigin/);
        assert.ok(!error.message.includes("shop.example-secret.com"), error.message);
        return true;
      });
    });
  }

  test("a refused value is not quoted in the error", () => {
    assert.throws(() => handoffMiddleware(client, { publicOrigin: "ftp://secret-host.example" }), (error) => {
      assert.ok(error instanceof ConfigurationError);
      assert.ok(!error.message.includes("secret-host"), error.message);
      return true;
    });
  });

  test("an origin is the page URL's", async () => {
    const real = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    const checkout = await startCheckout(real, { publicOrigin: "https://checkout.example-pay.com/", event: "Origin Landed" });
    try {
      const handoff = await real.prepare({ anonymousId: "visitor-origin", destination: `${checkout.origin}/cart?x=1` });
      const landing = new URL(handoff.redirectUrl);
      const answer = await get(checkout.port, landing.pathname + landing.search);
      assert.equal(answer.status, 303);
      assert.equal(answer.headers.location, "/cart?x=1");
      const track = await waitForEvent((e) => e.type === "track" && e.anonymousId === "visitor-origin" && e.event === "Origin Landed");
      assert.equal(track.context.page.url, "https://checkout.example-pay.com/cart?x=1");
    } finally {
      await checkout.close();
    }
  });
});
