// Retries: prepare only, counted against tiny real node:http servers; exchange never.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  ConfigurationError,
  IdentityClient,
  IdentityConnectionError,
  IdentityError,
  ServiceUnavailable,
} from "../dist/esm/index.js";
import { freePort, startHttpServer } from "./helpers.mjs";

const UNAVAILABLE = JSON.stringify({
  type: "urn:identity-service:problem:service-unavailable",
  title: "A dependency of the service is unavailable",
  status: 503,
  detail: "the handoff store is unavailable; retry later",
});
const PREPARED = JSON.stringify({
  token: "t".repeat(43),
  expiresIn: 300,
  expiresAt: "2030-01-01T00:00:00.000Z",
  redirectUrl: `http://checkout.localhost/?handoff_token=${"t".repeat(43)}`,
});

function answer(res, status, body, headers = {}) {
  res.writeHead(status, {
    "content-type": status >= 400 ? "application/problem+json" : "application/json",
    ...headers,
  });
  res.end(body);
}

/** 503 (with `retryAfter`) `failures` times, then 201. */
function flaky(failures, retryAfter = "0") {
  return (req, res, count) => {
    if (count <= failures) answer(res, 503, UNAVAILABLE, { "retry-after": retryAfter });
    else answer(res, 201, PREPARED);
  };
}

const params = { anonymousId: "a", destination: "http://checkout.localhost/" };

describe("prepare retries", () => {
  test("503 twice then 201: three requests, the 201 answered", async () => {
    const seen = [];
    const server = await startHttpServer((req, res, count, body) => {
      seen.push({ method: req.method, url: req.url, auth: req.headers.authorization, body: JSON.parse(body) });
      flaky(2)(req, res, count);
    });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", maxRetries: 2, backoffBaseMs: 10 });
      const handoff = await client.prepare(params);
      assert.equal(handoff.token, "t".repeat(43));
      assert.equal(handoff.expiresAt.toISOString(), "2030-01-01T00:00:00.000Z");
      assert.equal(server.count, 3);
      for (const request of seen) {
        assert.equal(request.method, "POST");
        assert.equal(request.url, "/v1/handoffs");
        assert.equal(request.auth, "Basic " + Buffer.from("k:").toString("base64"));
        assert.deepEqual(request.body, params);
      }
    } finally {
      await server.close();
    }
  });

  test("retries are bounded: maxRetries 1 gives up after two requests", async () => {
    const server = await startHttpServer(flaky(5));
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", maxRetries: 1, backoffBaseMs: 10 });
      await assert.rejects(client.prepare(params), (error) => {
        assert.ok(error instanceof ServiceUnavailable);
        assert.equal(error.retryAfter, 0);
        return true;
      });
      assert.equal(server.count, 2);
    } finally {
      await server.close();
    }
  });

  test("Retry-After is honoured, and capped by maxBackoffMs", async () => {
    const server = await startHttpServer(flaky(1, "1"));
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", backoffBaseMs: 1 });
      const started = Date.now();
      await client.prepare(params);
      assert.ok(Date.now() - started >= 950, `waited ${Date.now() - started} ms`);
    } finally {
      await server.close();
    }
    const slow = await startHttpServer(flaky(1, "3600"));
    try {
      const client = new IdentityClient({ baseUrl: slow.url, writeKey: "k", maxBackoffMs: 100 });
      const started = Date.now();
      await client.prepare(params);
      assert.ok(Date.now() - started < 1000, `waited ${Date.now() - started} ms`);
      assert.equal(slow.count, 2);
    } finally {
      await slow.close();
    }
  });

  test("a dropped connection is retried; a 4xx is not", async () => {
    const server = await startHttpServer((req, res, count) => {
      if (count <= 2) req.socket.destroy();
      else answer(res, 201, PREPARED);
    });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", backoffBaseMs: 10 });
      assert.equal((await client.prepare(params)).token, "t".repeat(43));
      assert.equal(server.count, 3);
    } finally {
      await server.close();
    }
    const refusing = await startHttpServer((req, res) =>
      answer(res, 401, JSON.stringify({ type: "urn:identity-service:problem:unauthorized", title: "Unauthorized", status: 401 })),
    );
    try {
      const client = new IdentityClient({ baseUrl: refusing.url, writeKey: "k", backoffBaseMs: 10 });
      await assert.rejects(client.prepare(params), { name: "Unauthorized" });
      assert.equal(refusing.count, 1);
    } finally {
      await refusing.close();
    }
  });

  test("a timeout is an IdentityConnectionError (and retried for prepare)", async () => {
    const server = await startHttpServer(() => {
      /* never answers */
    });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", timeoutMs: 150, maxRetries: 1, backoffBaseMs: 1 });
      await assert.rejects(client.prepare(params), (error) => {
        assert.ok(error instanceof IdentityConnectionError);
        assert.equal(error.status, null);
        assert.match(error.message, /timed out after 150 ms/);
        return true;
      });
      assert.equal(server.count, 2);
    } finally {
      await server.close();
    }
  });

  test("nothing listening: IdentityConnectionError after the retries", async () => {
    const port = await freePort();
    const client = new IdentityClient({ baseUrl: `http://127.0.0.1:${port}`, writeKey: "secret-key-x", backoffBaseMs: 1 });
    await assert.rejects(client.prepare(params), (error) => {
      assert.ok(error instanceof IdentityConnectionError);
      assert.match(error.message, /ECONNREFUSED/);
      assert.ok(!error.message.includes("secret-key-x"));
      return true;
    });
  });
});

/** `at` (ms since the epoch) as an HTTP-date in one of RFC 9110 5.6.7's three forms. */
function httpDate(at, form = "imf") {
  const date = new Date(at);
  const imf = date.toUTCString(); // "Sun, 06 Nov 1994 08:49:37 GMT"
  const [, day, month, year, time] = imf.split(" ");
  if (form === "rfc850") {
    const weekday = date.toLocaleDateString("en-US", { weekday: "long", timeZone: "UTC" });
    return `${weekday}, ${day}-${month}-${year.slice(2)} ${time} GMT`;
  }
  if (form === "asctime") return `${imf.slice(0, 3)} ${month} ${String(Number(day)).padStart(2, " ")} ${time} ${year}`;
  return imf;
}

/** The `retryAfter` of the error a real server's `status` answer with `Retry-After: value` gives. */
async function retryAfterOf(status, value) {
  const server = await startHttpServer((req, res) => answer(res, status, "{}", { "retry-after": value }));
  try {
    const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", maxRetries: 0 });
    const error = await client.prepare(params).then(
      () => assert.fail("no error"),
      (caught) => caught,
    );
    assert.equal(error.status, status);
    return error.retryAfter;
  } finally {
    await server.close();
  }
}

describe("Retry-After: delay-seconds or an HTTP-date (RFC 9110 10.2.3), as the Python SDK reads it", () => {
  for (const status of [503, 429]) {
    for (const form of ["seconds", "imf", "rfc850", "asctime"]) {
      test(`${status} with ${form}`, async () => {
        const value = form === "seconds" ? "7" : httpDate(Date.now() + 7000, form);
        assert.ok([6, 7, 8].includes(await retryAfterOf(status, value)), value);
      });
    }
  }

  test("a date already past is 0", async () => {
    for (const form of ["imf", "rfc850", "asctime"]) assert.equal(await retryAfterOf(503, httpDate(Date.now() - 3_600_000, form)), 0);
  });

  test("asctime's date, which has no zone, is UTC whatever the process's time zone", async () => {
    const zone = process.env.TZ;
    process.env.TZ = "America/New_York"; // Date.parse read it in local time: 4 or 5 hours off
    try {
      assert.ok([6, 7, 8].includes(await retryAfterOf(503, httpDate(Date.now() + 7000, "asctime"))));
    } finally {
      if (zone === undefined) delete process.env.TZ;
      else process.env.TZ = zone;
    }
  });

  test("an RFC 850 year is this century's, unless more than 50 years ahead", async () => {
    const year = new Date().getUTCFullYear();
    const ahead = String((year + 40) % 100).padStart(2, "0");
    const behind = String((year + 60) % 100).padStart(2, "0");
    assert.ok((await retryAfterOf(503, `Friday, 01-Jan-${ahead} 00:00:00 GMT`)) > 30 * 365 * 86400);
    assert.equal(await retryAfterOf(503, `Friday, 01-Jan-${behind} 00:00:00 GMT`), 0);
  });

  // Date.parse read most of these as dates (of 2001, of 2030): neither delay-seconds nor an
  // HTTP-date, each is absent, as in the Python SDK.
  const INVALID = ["1.5", "-3", "+5", "1e3", "0x10", "soon", "2030-01-01T00:00:00Z", "2030-01-01", "9".repeat(400),
    "Sun, 06 Nov 1994 08:49:37 +0000", "Sun, 31 Feb 2030 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT",
    "Sun, 06 Nov 1994 08:49:37 GMT; x", "06 Nov 2030 08:49:37 GMT", "Sat, 29 Feb 2031 08:49:37 GMT",
    "Mon, 01 Jan 0000 00:00:00 GMT"];
  for (const value of INVALID) {
    test(`${JSON.stringify(value.length > 20 && /^9+$/.test(value) ? "9 × 400" : value)} is absent`, async () => {
      assert.equal(await retryAfterOf(503, value), null);
    });
  }

  test("an HTTP-date is waited before the retried prepare, capped by maxBackoffMs", async () => {
    const server = await startHttpServer(flaky(1, httpDate(Date.now() + 2000)));
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", backoffBaseMs: 1 });
      const started = Date.now();
      await client.prepare(params);
      assert.ok(Date.now() - started >= 900, `waited ${Date.now() - started} ms`);
    } finally {
      await server.close();
    }
    const slow = await startHttpServer(flaky(20, httpDate(Date.now() + 3_600_000)));
    try {
      const client = new IdentityClient({ baseUrl: slow.url, writeKey: "k", maxRetries: 20, backoffBaseMs: 500, maxBackoffMs: 50 });
      const started = Date.now();
      await client.prepare(params);
      assert.ok(Date.now() - started < 2500, `waited ${Date.now() - started} ms`);
      assert.equal(slow.count, 21);
    } finally {
      await slow.close();
    }
  });
});

describe("exchange is never retried", () => {
  test("a 503 is answered after one request, whatever maxRetries", async () => {
    const server = await startHttpServer(flaky(5));
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", maxRetries: 5, backoffBaseMs: 1 });
      await assert.rejects(client.exchange("t".repeat(43), { fallback: true }), ServiceUnavailable);
      assert.equal(server.count, 1);
    } finally {
      await server.close();
    }
  });

  test("a lost answer (connection dropped) is not retried either", async () => {
    const server = await startHttpServer((req) => req.socket.destroy());
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", maxRetries: 5, backoffBaseMs: 1 });
      await assert.rejects(client.exchange("t".repeat(43)), IdentityConnectionError);
      assert.equal(server.count, 1);
    } finally {
      await server.close();
    }
  });

  test("a timeout is not retried", async () => {
    const server = await startHttpServer(() => {});
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", timeoutMs: 100, maxRetries: 5 });
      await assert.rejects(client.exchange("t".repeat(43)), IdentityConnectionError);
      assert.equal(server.count, 1);
    } finally {
      await server.close();
    }
  });
});

describe("retry settings", () => {
  // A negative delay waited no time, NaN 1 ms, Infinity 1 ms (setTimeout's reading of
  // them), and a negative maxRetries was read as 0: each is refused when the client is
  // made, as the Python SDK refuses them.
  const INVALID = [
    { backoffBaseMs: -500 },
    { backoffBaseMs: Number.NaN },
    { backoffBaseMs: Number.POSITIVE_INFINITY },
    { backoffBaseMs: "200" },
    { maxBackoffMs: -1 },
    { maxBackoffMs: Number.NaN },
    { maxBackoffMs: Number.POSITIVE_INFINITY },
    { maxRetries: -1 },
    { maxRetries: 1.5 },
    { maxRetries: Number.NaN },
    { maxRetries: "2" },
  ];
  for (const setting of INVALID) {
    const [name, value] = Object.entries(setting)[0];
    test(`${name}: ${typeof value === "string" ? JSON.stringify(value) : value} is a ConfigurationError`, () => {
      assert.throws(
        () => new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey: "k", ...setting }),
        (error) => {
          assert.ok(error instanceof ConfigurationError && error instanceof IdentityError);
          assert.match(error.message, new RegExp(name));
          return true;
        },
      );
    });
  }

  // Each made every call fail as an IdentityConnectionError (AbortSignal.timeout's
  // RangeError, caught as a failed fetch): an outage, to whoever reads it; a timeoutMs
  // over 2^31 - 1 timed every call out after 1 ms, as a delay that long waited 1 ms.
  const INVALID_TIMEOUTS = [-1, 0, Number.NaN, Number.POSITIVE_INFINITY, 1.5, 2 ** 31, "5000"];
  for (const timeoutMs of INVALID_TIMEOUTS) {
    test(`timeoutMs: ${typeof timeoutMs === "string" ? JSON.stringify(timeoutMs) : timeoutMs} is a ConfigurationError`, async () => {
      const server = await startHttpServer(flaky(0));
      try {
        assert.throws(
          () => new IdentityClient({ baseUrl: server.url, writeKey: "k", timeoutMs }),
          (error) => {
            assert.ok(error instanceof ConfigurationError && error instanceof IdentityError);
            assert.match(error.message, /timeoutMs/);
            return true;
          },
        );
        assert.equal(server.count, 0);
      } finally {
        await server.close();
      }
    });
  }

  for (const setting of [{ backoffBaseMs: 2 ** 31 }, { maxBackoffMs: 2 ** 31 }]) {
    const [name] = Object.keys(setting);
    test(`${name} over 2^31 - 1 (a delay setTimeout waits as 1 ms) is a ConfigurationError`, () => {
      assert.throws(() => new IdentityClient({ baseUrl: "http://127.0.0.1:1", writeKey: "k", ...setting }), (error) => {
        assert.ok(error instanceof ConfigurationError);
        assert.match(error.message, new RegExp(name));
        return true;
      });
    });
  }

  test("the longest timeoutMs a timer can wait is valid, and calls go through", async () => {
    const server = await startHttpServer(flaky(0));
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", timeoutMs: 2 ** 31 - 1, maxBackoffMs: 2 ** 31 - 1 });
      assert.equal(client.timeoutMs, 2 ** 31 - 1);
      assert.equal((await client.prepare(params)).token, "t".repeat(43));
    } finally {
      await server.close();
    }
  });

  test("a Retry-After is waited past a thousand retries, with no backoff", async () => {
    // From retry 1024 on, 0 * 2 ** attempt was 0 * Infinity: NaN, which made Math.max drop
    // the Retry-After and setTimeout wait 1 ms.
    const seen = [];
    const server = await startHttpServer((req, res, count) => {
      seen.push(Date.now());
      if (count <= 1024) answer(res, 503, UNAVAILABLE);
      else if (count === 1025) answer(res, 503, UNAVAILABLE, { "retry-after": "1" });
      else answer(res, 201, PREPARED);
    });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", maxRetries: 1100, backoffBaseMs: 0 });
      await client.prepare(params);
      assert.equal(server.count, 1026);
      assert.ok(seen[1025] - seen[1024] >= 950, `waited ${seen[1025] - seen[1024]} ms`);
    } finally {
      await server.close();
    }
  });

  test("no backoff at all (0) is valid, and retries at once", async () => {
    const server = await startHttpServer(flaky(2, "5"));
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", backoffBaseMs: 0, maxBackoffMs: 0 });
      const started = Date.now();
      await client.prepare(params);
      assert.ok(Date.now() - started < 1000, `waited ${Date.now() - started} ms`);
      assert.equal(server.count, 3);
    } finally {
      await server.close();
    }
  });
});
