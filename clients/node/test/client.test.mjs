// The client against the real service: round trip, and errors mapped from real answers.
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { after, before, describe, test } from "node:test";

import {
  APIError,
  ConfigurationError,
  DestinationNotAllowed,
  EventTooLarge,
  IdentityClient,
  IdentityError,
  InvalidRequest,
  PayloadTooLarge,
  ServiceUnavailable,
  TokenNotFound,
  Unauthorized,
} from "../dist/esm/index.js";
import { WRITE_KEY, startHttpServer, startService } from "./helpers.mjs";

const DESTINATION = "http://checkout.localhost:3000/cart?step=1";
let service;

before(async () => {
  service = await startService();
});
after(async () => {
  await service?.stop();
});

describe("IdentityClient against the real service", () => {
  test("prepare then exchange carries the identity, once", async () => {
    const client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    const before = Date.now();
    const handoff = await client.prepare({
      anonymousId: "8a1f5c0e-visitor",
      userId: "user-42",
      traits: { plan: "pro" },
      consent: { analytics: true },
      context: { page: { url: "http://shop.localhost/p/1" } },
      destination: DESTINATION,
      ttl: 120,
    });
    assert.match(handoff.token, /^[A-Za-z0-9_-]{43}$/);
    assert.equal(handoff.redirectUrl, `${DESTINATION}&handoff_token=${handoff.token}`);
    assert.ok(handoff.expiresAt instanceof Date);
    assert.equal(handoff.expiresIn, 120);
    const ttlMs = handoff.expiresAt.getTime() - before;
    assert.ok(ttlMs > 118_000 && ttlMs < 122_000, `expiresAt ${handoff.expiresAt.toISOString()}`);

    const identity = await client.exchange(handoff.token, { event: "Checkout Started", properties: { step: 1 } });
    assert.equal(identity.anonymousId, "8a1f5c0e-visitor");
    assert.equal(identity.userId, "user-42");
    assert.deepEqual(identity.traits, { plan: "pro" });
    assert.deepEqual(identity.consent, { analytics: true });
    assert.equal(identity.source, "handoff");
    assert.equal(identity.preparedBy, "dev");
    assert.ok(identity.preparedAt instanceof Date);
    assert.equal(identity.destination, DESTINATION);

    // A token works once: 404 token-not-found, or a generated id with fallback.
    await assert.rejects(client.exchange(handoff.token), (error) => {
      assert.ok(error instanceof TokenNotFound);
      assert.ok(error instanceof IdentityError);
      assert.equal(error.name, "TokenNotFound");
      assert.equal(error.status, 404);
      assert.equal(error.type, "urn:identity-service:problem:token-not-found");
      assert.equal(error.slug, "token-not-found");
      assert.ok(error.title);
      assert.ok(error.requestId);
      return true;
    });
    const generated = await client.exchange(handoff.token, { fallback: true });
    assert.equal(generated.source, "generated");
    assert.match(generated.anonymousId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.equal(generated.userId, null);
  });

  test("defaults come from IDENTITY_URL and IDENTITY_WRITE_KEY", async () => {
    process.env.IDENTITY_URL = service.url + "/";
    process.env.IDENTITY_WRITE_KEY = WRITE_KEY;
    try {
      const client = new IdentityClient();
      assert.equal(client.baseUrl, service.url);
      const handoff = await client.prepare({ anonymousId: "env-visitor", destination: DESTINATION });
      assert.equal(handoff.expiresIn, 300);
      assert.equal((await client.exchange(handoff.token)).anonymousId, "env-visitor");
    } finally {
      delete process.env.IDENTITY_URL;
      delete process.env.IDENTITY_WRITE_KEY;
    }
    for (const options of [{ baseUrl: service.url }, { writeKey: WRITE_KEY }]) {
      assert.throws(
        () => new IdentityClient(options),
        (error) => error instanceof ConfigurationError && error instanceof IdentityError && !(error instanceof TypeError),
      );
    }
  });

  test("a body JSON cannot hold is an InvalidRequest, and nothing is sent", async () => {
    // JSON.stringify sent NaN and Infinity as null (a value the caller never gave), and
    // threw a raw TypeError for a BigInt or a cycle; the Python SDK refuses them all.
    const server = await startHttpServer((req, res) => {
      res.writeHead(500);
      res.end();
    });
    const cyclic = { a: 1 };
    cyclic.self = cyclic;
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: WRITE_KEY, maxRetries: 0 });
      const calls = [
        () => client.exchange("t".repeat(43), { fallback: true, properties: { total: Number.NaN } }),
        () => client.exchange("t".repeat(43), { fallback: true, context: { page: { n: [1, Number.POSITIVE_INFINITY] } } }),
        () => client.prepare({ anonymousId: "v", destination: DESTINATION, traits: { score: Number.NEGATIVE_INFINITY } }),
        () => client.prepare({ anonymousId: "v", destination: DESTINATION, ttl: Number.NaN }),
        () => client.exchange("t".repeat(43), { properties: { big: 10n } }),
        () => client.prepare({ anonymousId: "v", destination: DESTINATION, traits: cyclic }),
      ];
      for (const call of calls) {
        await assert.rejects(call(), (error) => {
          assert.ok(error instanceof InvalidRequest, `${error?.name}: ${error?.message}`);
          assert.equal(error.status, null);
          assert.match(error.message, /cannot be sent as JSON/);
          return true;
        });
      }
      assert.equal(server.count, 0);
    } finally {
      await server.close();
    }
    // Finite numbers go as they are (the real service).
    const client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    const handoff = await client.prepare({ anonymousId: "finite", destination: DESTINATION, traits: { score: 1.5e300 } });
    assert.deepEqual((await client.exchange(handoff.token)).traits, { score: 1.5e300 });
  });

  test("the error classes form the Python SDK's hierarchy", () => {
    assert.ok(EventTooLarge.prototype instanceof PayloadTooLarge);
    for (const cls of [InvalidRequest, Unauthorized, TokenNotFound, PayloadTooLarge, ServiceUnavailable]) {
      assert.ok(cls.prototype instanceof APIError, cls.name);
    }
    assert.ok(!(ConfigurationError.prototype instanceof APIError));
    assert.equal(new ConfigurationError("x").name, "ConfigurationError");
  });

  test("an event over 32 KB: EventTooLarge, caught as PayloadTooLarge", async () => {
    // A body limit over the event limit, so that the event (not the body) is too large.
    const roomy = await startService({ IDENTITY_MAX_BODY_BYTES: "65536" });
    try {
      const client = new IdentityClient({ baseUrl: roomy.url, writeKey: WRITE_KEY });
      const handoff = await client.prepare({ anonymousId: "big-event", destination: DESTINATION });
      await assert.rejects(
        client.exchange(handoff.token, { properties: { note: "x".repeat(40_000) } }),
        (error) => error instanceof EventTooLarge && error instanceof PayloadTooLarge && error.status === 413,
      );
    } finally {
      await roomy.stop();
    }
  });

  test("401 unauthorized, without the write key anywhere in the error", async () => {
    const secretKey = "wrong-write-key-that-must-not-leak";
    const client = new IdentityClient({ baseUrl: service.url, writeKey: secretKey });
    await assert.rejects(client.prepare({ anonymousId: "a", destination: DESTINATION }), (error) => {
      assert.ok(error instanceof Unauthorized);
      assert.equal(error.status, 401);
      assert.equal(error.type, "urn:identity-service:problem:unauthorized");
      assert.ok(!error.message.includes(secretKey));
      assert.ok(!JSON.stringify({ ...error, message: error.message }).includes(secretKey));
      return true;
    });
    await assert.rejects(client.exchange("x".repeat(43)), Unauthorized);
    assert.ok(!JSON.stringify(client).includes(secretKey));
    const { inspect } = await import("node:util");
    assert.ok(!inspect(client).includes(secretKey));
  });

  test("400 validation-failed carries the field errors", async () => {
    const client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    await assert.rejects(client.prepare({ anonymousId: "a", destination: "not a url", ttl: 0 }), (error) => {
      assert.ok(error instanceof InvalidRequest);
      assert.equal(error.status, 400);
      assert.equal(error.type, "urn:identity-service:problem:validation-failed");
      const fields = error.errors.map((e) => e.field);
      assert.ok(fields.includes("destination"), JSON.stringify(error.errors));
      assert.ok(fields.includes("ttl"), JSON.stringify(error.errors));
      for (const e of error.errors) assert.equal(typeof e.message, "string");
      return true;
    });
    await assert.rejects(client.prepare({ destination: DESTINATION }), InvalidRequest);
  });

  test("403 destination-not-allowed", async () => {
    const client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    await assert.rejects(
      client.prepare({ anonymousId: "a", destination: "https://elsewhere.example.com/" }),
      (error) => error instanceof DestinationNotAllowed && error.status === 403,
    );
  });

  test("the CommonJS build works the same", async () => {
    const require = createRequire(import.meta.url);
    const cjs = require("@identity-service/client");
    assert.notEqual(cjs.IdentityClient, IdentityClient, "require resolves to the CommonJS build");
    const client = new cjs.IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY });
    const handoff = await client.prepare({ anonymousId: "cjs-visitor", destination: DESTINATION });
    assert.equal((await client.exchange(handoff.token)).anonymousId, "cjs-visitor");
    await assert.rejects(client.exchange(handoff.token), cjs.TokenNotFound);
  });
});

describe("baseUrl", () => {
  // Each was taken as given: user info made fetch refuse every call (an outage, to whoever
  // reads it) with the password in the error's message; a query or a fragment had the
  // call's path appended to it (every call to "/?x=1/v1/handoffs" or "/"); another scheme
  // or no URL failed every call too. The Python SDK refuses the same.
  const INVALID = [
    "ftp://identity.internal",
    "identity.internal:8000",
    "http://",
    "http://[::1",
    "http://user:secret-pw@identity.internal",
    "http://user@identity.internal",
    "http://:secret-pw@identity.internal/base",
    "http://identity.internal/?x=1",
    "http://identity.internal?",
    "http://identity.internal/base#part",
    "http://identity.internal#",
  ];
  for (const baseUrl of INVALID) {
    test(`${baseUrl} is a ConfigurationError that does not show it`, () => {
      assert.throws(
        () => new IdentityClient({ baseUrl, writeKey: WRITE_KEY }),
        (error) => {
          assert.ok(error instanceof ConfigurationError);
          assert.match(error.message, /baseUrl/);
          assert.ok(!error.message.includes("secret-pw"));
          return true;
        },
      );
    });
  }

  test("a path prefix is kept: calls go under it", async () => {
    const seen = [];
    const server = await startHttpServer((req, res) => {
      seen.push(req.url);
      res.writeHead(503, { "content-type": "application/problem+json" });
      res.end("{}");
    });
    try {
      const client = new IdentityClient({ baseUrl: `${server.url}/identity/`, writeKey: WRITE_KEY, maxRetries: 0 });
      await assert.rejects(client.prepare({ anonymousId: "a", destination: "http://b.localhost/" }), ServiceUnavailable);
      assert.deepEqual(seen, ["/identity/v1/handoffs"]);
    } finally {
      await server.close();
    }
  });
});

describe("writeKey", () => {
  // Sent as HTTP Basic's user name, a ':' ends it there (the service read "secret"), and the
  // service reads only printable ASCII keys: every call was Unauthorized. As in Python.
  for (const writeKey of ["secret:key-0123456789", "secret-clé-0123456789", "secret\r\nX-Key: 1", "secret\u0000"]) {
    test(`${JSON.stringify(writeKey)} is a ConfigurationError that does not show it`, () => {
      assert.throws(
        () => new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey }),
        (error) => {
          assert.ok(error instanceof ConfigurationError);
          assert.match(error.message, /writeKey/);
          assert.ok(!error.message.includes("secret"));
          return true;
        },
      );
    });
  }
});

describe("headers", () => {
  const INVALID = [
    // fetch refused them at every call: an IdentityConnectionError, an outage to whoever reads it.
    { "x-trace": "a\r\nx-injected: 1" },
    { "x-trace": "a\u0000" },
    { "x trace": "a" },
    { "": "a" },
    { Connection: "close" },
    { Expect: "100-continue" },
    { "content-length": "2" },
    { "Transfer-Encoding": "chunked" },
    // Added to the client's own: "Bearer other, Basic ..." was no credential the service reads.
    { Authorization: "Bearer other" },
    { "content-type": "text/plain" },
    { ACCEPT: "text/html" },
  ];
  for (const headers of INVALID) {
    test(`${JSON.stringify(headers)} is a ConfigurationError that does not show the value`, () => {
      assert.throws(
        () => new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey: WRITE_KEY, headers }),
        (error) => {
          assert.ok(error instanceof ConfigurationError);
          assert.match(error.message, /headers/);
          assert.ok(!error.message.includes("Bearer other") && !error.message.includes("x-injected"));
          return true;
        },
      );
    });
  }

  test("valid ones are sent with every call", async () => {
    const seen = [];
    const server = await startHttpServer((req, res) => {
      seen.push([req.headers["x-trace"], req.headers.authorization]);
      res.writeHead(503, { "content-type": "application/problem+json" });
      res.end("{}");
    });
    try {
      const headers = { "X-Trace": " 00-abc-01 " };
      const client = new IdentityClient({ baseUrl: server.url, writeKey: WRITE_KEY, maxRetries: 0, headers });
      await assert.rejects(client.prepare({ anonymousId: "a", destination: "http://b.localhost/" }), ServiceUnavailable);
      assert.deepEqual(seen, [["00-abc-01", `Basic ${Buffer.from(`${WRITE_KEY}:`).toString("base64")}`]]);
    } finally {
      await server.close();
    }
  });
});
