// Answers the service never gives, from tiny real node:http servers: malformed 2xx bodies
// are APIError (never a value, never a raw TypeError), a secret an upstream echoes is in no
// field of the error, and an error answer without a problem type gets the Python SDK's class.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { inspect, promisify } from "node:util";
import { describe, test } from "node:test";

import {
  APIError,
  IdentityClient,
  IdentityError,
  PayloadTooLarge,
  RateLimited,
  ServiceUnavailable,
  TokenNotFound,
  Unauthorized,
  UnsupportedMediaType,
  handoffMiddleware,
} from "../dist/esm/index.js";
import { SERVICE_BIN, startHttpServer } from "./helpers.mjs";

const TOKEN = "T0kenT0kenT0kenT0kenT0kenT0kenT0kenT0kenT0k"; // 43 characters, as the service's

// What the Python SDK's exchange makes of each base URL's answer: ["identity", anonymousId,
// userId], or [the error's class, its title].
const PYTHON_EXCHANGES = [
  "import json, sys",
  "from identity_client import IdentityClient, IdentityError",
  "found = []",
  "for base in sys.argv[1:]:",
  "    with IdentityClient(base, 'write-key-0123456789') as client:",
  "        try:",
  "            identity = client.exchange('t' * 43)",
  "            found.append(['identity', identity.anonymous_id, identity.user_id])",
  "        except IdentityError as error:",
  "            found.append([type(error).__name__, getattr(error, 'title', None)])",
  "print(json.dumps(found))",
].join("\n");

async function pythonExchanges(bases) {
  const here = path.dirname(fileURLToPath(import.meta.url));
  // Asynchronously: this process serves the Python client's requests.
  const ran = await promisify(execFile)(path.join(path.dirname(SERVICE_BIN), "python"), ["-c", PYTHON_EXCHANGES, ...bases], {
    env: { ...process.env, PYTHONPATH: path.resolve(here, "..", "..", "python") },
  });
  return JSON.parse(ran.stdout);
}
const PREPARED = {
  token: TOKEN,
  redirectUrl: `http://checkout.localhost/cart?handoff_token=${TOKEN}`,
  expiresAt: "2030-01-01T00:00:00.000Z",
  expiresIn: 300,
};
const EXCHANGED = {
  anonymousId: "visitor-1",
  userId: null,
  traits: {},
  context: {},
  consent: {},
  source: "handoff",
  preparedBy: "shop",
  preparedAt: "2030-01-01T00:00:00.000Z",
  destination: "http://checkout.localhost/cart",
};
const params = { anonymousId: "a", destination: "http://checkout.localhost/cart" };

/** A server answering every request `status` with `body` as sent (a string) or as JSON. */
function answering(status, body, headers = {}) {
  return startHttpServer((req, res) => {
    res.writeHead(status, { "content-type": "application/json", ...headers });
    res.end(typeof body === "string" ? body : JSON.stringify(body));
  });
}

async function withServer(status, body, run, headers = {}) {
  const server = await answering(status, body, headers);
  try {
    return await run(new IdentityClient({ baseUrl: server.url, writeKey: "write-key-0123456789", maxRetries: 0 }));
  } finally {
    await server.close();
  }
}

/** A malformed answer: an APIError with the answer's status, that names the field, not its value. */
function malformed(status, field) {
  return (error) => {
    assert.ok(!(error instanceof TypeError), String(error));
    assert.ok(error instanceof APIError, String(error));
    assert.equal(error.constructor, APIError);
    assert.equal(error.status, status);
    if (field) assert.match(error.message, new RegExp(`the answer's ${field} is not`));
    return true;
  };
}

describe("malformed 2xx answers are APIError", () => {
  test("prepare: {} and wrong types are refused, not turned into strings", async () => {
    const cases = [
      [{}, "token"],
      [{ ...PREPARED, token: null }, "token"],
      [{ ...PREPARED, token: "" }, "token"],
      [{ ...PREPARED, token: 42 }, "token"],
      [{ ...PREPARED, redirectUrl: undefined }, "redirectUrl"],
      [{ ...PREPARED, redirectUrl: "undefined" }, "redirectUrl"],
      [{ ...PREPARED, redirectUrl: "javascript:alert(1)" }, "redirectUrl"],
      [{ ...PREPARED, expiresAt: "tomorrow" }, "expiresAt"],
      [{ ...PREPARED, expiresAt: 1 }, "expiresAt"],
      [{ ...PREPARED, expiresIn: "300" }, "expiresIn"],
      [{ ...PREPARED, expiresIn: null }, "expiresIn"],
    ];
    for (const [body, field] of cases) {
      await withServer(201, body, (client) => assert.rejects(client.prepare(params), malformed(201, field)));
    }
  });

  test("exchange: {} and wrong types are refused", async () => {
    const cases = [
      [{}, "anonymousId"],
      // No anonymousId is an identity only with a userId (a handoff prepared with one alone).
      [{ ...EXCHANGED, anonymousId: null }, "anonymousId"],
      [{ ...EXCHANGED, anonymousId: undefined }, "anonymousId"],
      [{ ...EXCHANGED, anonymousId: null, userId: "" }, "anonymousId"],
      [{ ...EXCHANGED, anonymousId: "" }, "anonymousId"],
      [{ ...EXCHANGED, anonymousId: "", userId: "u-1" }, "anonymousId"],
      [{ ...EXCHANGED, anonymousId: 7 }, "anonymousId"],
      [{ ...EXCHANGED, anonymousId: 7, userId: "u-1" }, "anonymousId"],
      [{ ...EXCHANGED, anonymousId: null, userId: 5 }, "userId"],
      [{ ...EXCHANGED, userId: 5 }, "userId"],
      [{ ...EXCHANGED, traits: [] }, "traits"],
      [{ ...EXCHANGED, traits: "x" }, "traits"],
      [{ ...EXCHANGED, consent: true }, "consent"],
      [{ ...EXCHANGED, preparedAt: "yesterday" }, "preparedAt"],
      [{ ...EXCHANGED, destination: {} }, "destination"],
    ];
    for (const [body, field] of cases) {
      await withServer(200, body, (client) => assert.rejects(client.exchange(TOKEN), malformed(200, field)));
    }
  });

  test("a body that is not a JSON object (null, an array, a string, a number) or not JSON", async () => {
    for (const body of ["null", "[]", '"token"', "42", "true", "not json"]) {
      await withServer(201, body, (client) => assert.rejects(client.prepare(params), malformed(201)));
      await withServer(200, body, (client) => assert.rejects(client.exchange(TOKEN), malformed(200)));
    }
  });

  test("well-formed answers still pass, optional fields absent or null", async () => {
    await withServer(201, PREPARED, async (client) => {
      const handoff = await client.prepare(params);
      assert.equal(handoff.token, TOKEN);
      assert.equal(handoff.expiresIn, 300);
      assert.equal(handoff.expiresAt.toISOString(), "2030-01-01T00:00:00.000Z");
    });
    await withServer(200, { anonymousId: "generated-1", source: "generated" }, async (client) => {
      const identity = await client.exchange(TOKEN, { fallback: true });
      assert.deepEqual(identity, {
        anonymousId: "generated-1",
        userId: null,
        traits: null,
        context: null,
        consent: null,
        source: "generated",
        preparedBy: null,
        preparedAt: null,
        destination: null,
      });
    });
  });

  test("a handoff prepared with a userId alone: anonymousId null is an identity", async () => {
    // What the service answers for it (identity_service/handoff.py; openapi: string or null).
    await withServer(200, { ...EXCHANGED, anonymousId: null, userId: "u-1" }, async (client) => {
      const identity = await client.exchange(TOKEN);
      assert.deepEqual(identity, {
        anonymousId: null,
        userId: "u-1",
        traits: {},
        context: {},
        consent: {},
        source: "handoff",
        preparedBy: "shop",
        preparedAt: new Date("2030-01-01T00:00:00.000Z"),
        destination: "http://checkout.localhost/cart",
      });
    });
    // Absent is null.
    await withServer(200, { userId: "u-1" }, async (client) => {
      const identity = await client.exchange(TOKEN);
      assert.equal(identity.anonymousId, null);
      assert.equal(identity.userId, "u-1");
    });
  });

  test("the middleware lands a userId alone: 303 to the clean URL, no cookie, no error", async () => {
    const upstream = await answering(200, { ...EXCHANGED, anonymousId: null, userId: "u-1", traits: { plan: "pro" } });
    const errors = [];
    const landed = [];
    const client = new IdentityClient({ baseUrl: upstream.url, writeKey: "write-key-0123456789" });
    const middleware = handoffMiddleware(client, { onError: (error) => errors.push(error), secure: false });
    const site = http.createServer((req, res) => {
      res.on("finish", () => landed.push(req.identity));
      middleware(req, res, () => res.end("page"));
    });
    await new Promise((resolve) => site.listen(0, "127.0.0.1", resolve));
    try {
      for (const cookie of [undefined, "ajs_anonymous_id=known-visitor"]) {
        const answer = await fetch(`http://127.0.0.1:${site.address().port}/cart?a=1&handoff_token=${TOKEN}`, {
          redirect: "manual",
          headers: cookie ? { cookie } : {},
        });
        assert.equal(answer.status, 303);
        assert.equal(answer.headers.get("location"), "/cart?a=1");
        assert.deepEqual(answer.headers.getSetCookie(), [], cookie);
        assert.deepEqual(errors, []);
        const { exchanged, ...identity } = landed.at(-1);
        assert.deepEqual(identity, {
          anonymousId: null,
          source: "handoff",
          userId: "u-1",
          traits: { plan: "pro" },
          consent: {},
        });
        assert.equal(exchanged.userId, "u-1");
      }
    } finally {
      site.closeAllConnections();
      await new Promise((resolve) => site.close(resolve));
      await upstream.close();
    }
  });

  test("the middleware takes its outage path: 303 to the clean URL, no cookie, onError", async () => {
    for (const body of [
      "{}",
      "null",
      JSON.stringify({ ...EXCHANGED, anonymousId: 1 }),
      JSON.stringify({ ...EXCHANGED, anonymousId: null, userId: null }),
    ]) {
      const upstream = await answering(200, body);
      const errors = [];
      const client = new IdentityClient({ baseUrl: upstream.url, writeKey: "write-key-0123456789" });
      const middleware = handoffMiddleware(client, { onError: (error) => errors.push(error), secure: false });
      const site = http.createServer((req, res) => middleware(req, res, () => res.end("page")));
      await new Promise((resolve) => site.listen(0, "127.0.0.1", resolve));
      try {
        const answer = await fetch(`http://127.0.0.1:${site.address().port}/cart?a=1&handoff_token=${TOKEN}`, {
          redirect: "manual",
        });
        assert.equal(answer.status, 303, body);
        assert.equal(answer.headers.get("location"), "/cart?a=1");
        assert.deepEqual(answer.headers.getSetCookie(), [], body);
        assert.equal(errors.length, 1);
        assert.ok(errors[0] instanceof APIError, String(errors[0]));
      } finally {
        site.closeAllConnections();
        await new Promise((resolve) => site.close(resolve));
        await upstream.close();
      }
    }
  });
});

describe("a secret an upstream echoes is in no field of the error", () => {
  const KEY = "write-key-that-must-not-leak-42";
  const BASIC = Buffer.from(`${KEY}:`).toString("base64");

  /** Echoes the Authorization header and the body in every text of a problem document. */
  async function echoing(status, extra = {}) {
    return startHttpServer((req, res, count, body) => {
      const auth = req.headers.authorization;
      const echoed = `auth ${auth}, key ${KEY}, Bearer ${KEY}, body ${body}`;
      res.writeHead(status, { "content-type": "application/problem+json", "x-request-id": `rid ${KEY}` });
      res.end(
        JSON.stringify({
          type: "about:blank",
          title: `Refused ${KEY}`,
          status,
          detail: echoed,
          instance: `/v1/${KEY}`,
          [`member-${KEY}`]: [echoed, { nested: echoed }],
          ...extra,
        }),
      );
    });
  }

  function clean(error, secrets) {
    assert.ok(error instanceof IdentityError, String(error));
    const views = {
      message: error.message,
      stack: error.stack,
      title: error.title,
      detail: error.detail,
      instance: error.instance,
      requestId: error.requestId,
      problem: JSON.stringify(error.problem),
      inspect: inspect(error, { depth: null }),
      json: JSON.stringify(error),
    };
    for (const [where, text] of Object.entries(views)) {
      for (const secret of secrets) assert.ok(!String(text).includes(secret), `${where} holds a secret: ${text}`);
    }
    assert.match(error.detail, /\*\*\*/);
    return true;
  }

  test("the write key, raw, as Basic credentials and Bearer, from prepare and exchange", async () => {
    for (const status of [400, 401, 500, 503]) {
      const server = await echoing(status);
      try {
        const client = new IdentityClient({ baseUrl: server.url, writeKey: KEY, maxRetries: 0 });
        await assert.rejects(client.prepare(params), (error) => clean(error, [KEY, BASIC]));
        await assert.rejects(client.exchange(TOKEN), (error) => clean(error, [KEY, BASIC, TOKEN]));
      } finally {
        await server.close();
      }
    }
  });

  test("the visitor's ids from prepare, as sent and as a gateway re-encoding the body escapes them", async () => {
    // As the Python SDK scrubs them: prepare's errors quoted the anonymousId and userId an
    // upstream echoed (the body), where an exchange's never quoted its token.
    const server = await startHttpServer((req, res, count, body) => {
      const escaped = body.replace(/[\u0080-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
      res.writeHead(400, { "content-type": "application/problem+json", "x-request-id": `rid ${escaped}` });
      res.end(JSON.stringify({ type: "about:blank", title: `Refused ${body}`, detail: `body ${body}, ${escaped}`, echo: [body] }));
    });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: KEY, maxRetries: 0 });
      const ids = { anonymousId: 'visitor-0042-vísitor "quoted"', userId: "josé.garcía@example.com" };
      await assert.rejects(client.prepare({ ...params, ...ids }), (error) =>
        clean(error, [KEY, BASIC, "visitor-0042", "josé", "jos\\u00e9", "garc", "quoted"]),
      );
      // An id no URL can hold (a lone surrogate): an APIError all the same, not a URIError.
      await assert.rejects(client.prepare({ ...params, anonymousId: "visitor-\ud800-lone" }), (error) => {
        assert.ok(error instanceof APIError, String(error));
        return true;
      });
      // A short id only where it stands alone: the rest of the text stays as it is.
      await assert.rejects(client.prepare({ ...params, anonymousId: "v1" }), (error) => {
        assert.ok(error.detail.includes('"anonymousId":"***"'), error.detail);
        assert.ok(error.detail.includes('"destination":"http://checkout.localhost/cart"'), error.detail);
        return true;
      });
    } finally {
      await server.close();
    }
  });

  test("a known problem type keeps its class and type while its texts are scrubbed", async () => {
    const server = await echoing(404, { type: "urn:identity-service:problem:token-not-found" });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: KEY });
      await assert.rejects(client.exchange(TOKEN), (error) => {
        assert.ok(error instanceof TokenNotFound);
        assert.equal(error.type, "urn:identity-service:problem:token-not-found");
        assert.equal(error.problem.type, "urn:identity-service:problem:token-not-found");
        return clean(error, [KEY, BASIC, TOKEN]);
      });
    } finally {
      await server.close();
    }
  });

  test("a short write key or token is scrubbed where it stands alone, as the Python SDK does", async () => {
    // A key "k" was replaced everywhere: "unknown scheme" became "un***nown scheme"; a token
    // under 8 characters (the middleware's "-") was not scrubbed at all.
    const server = await startHttpServer((req, res, count, body) => {
      res.writeHead(400, { "content-type": "application/problem+json" });
      const auth = req.headers.authorization;
      res.end(JSON.stringify({ type: "urn:gateway:bad", title: "Bad", detail: `unknown scheme, key k, ${auth}, body ${body}` }));
    });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: "k", maxRetries: 0 });
      const basic = Buffer.from("k:").toString("base64");
      await assert.rejects(client.exchange("-"), (error) => {
        assert.ok(error instanceof APIError, String(error));
        assert.ok(error.detail.startsWith("unknown scheme, key ***, Basic ***, body "), error.detail);
        assert.ok(error.detail.includes('"token":"***"'), error.detail);
        assert.ok(!error.detail.includes(basic), error.detail);
        assert.equal(error.type, "urn:gateway:bad");
        return true;
      });
    } finally {
      await server.close();
    }
  });

  test("a 2xx answer that is not JSON: no piece of it in the error (JSON.parse's message quotes one)", async () => {
    const server = await startHttpServer((req, res, count, body) => {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(req.url.endsWith("/exchange") ? JSON.parse(body).token : KEY);
    });
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: KEY, maxRetries: 0 });
      await assert.rejects(client.prepare(params), (error) => {
        assert.ok(error instanceof APIError);
        assert.ok(!inspect(error, { depth: null }).includes(KEY.slice(0, 8)), inspect(error));
        return true;
      });
      await assert.rejects(client.exchange(TOKEN), (error) => {
        assert.ok(error instanceof APIError);
        assert.ok(!inspect(error, { depth: null }).includes(TOKEN.slice(0, 8)), inspect(error));
        return true;
      });
    } finally {
      await server.close();
    }
  });
});

describe("an answer that is not HTTP echoing the request: no secret in the connection error", () => {
  const KEY = "write-key-that-must-not-leak-42";
  const BASIC = Buffer.from(`${KEY}:`).toString("base64");

  /** A broken proxy: its answer's header line quotes the request's Authorization and body. */
  function brokenEcho() {
    return new Promise((resolve) => {
      const server = net.createServer((socket) => {
        let data = "";
        socket.on("data", (chunk) => {
          data += chunk.toString("latin1");
          const end = data.indexOf("\r\n\r\n");
          const length = /content-length: *(\d+)/i.exec(data);
          if (end < 0 || !length || data.length - end - 4 < Number(length[1])) return;
          const auth = /authorization: *([^\r]*)/i.exec(data)?.[1] ?? "";
          const body = data.slice(end + 4);
          socket.end(`HTTP/1.1 200 OK\r\nX-Echo ${body} ${auth} ${KEY}\r\nContent-Length: 0\r\n\r\n`);
        });
      });
      server.listen(0, "127.0.0.1", () =>
        resolve({ url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) }),
      );
    });
  }

  test("util.inspect of the IdentityConnectionError (its cause chain too) shows neither the token nor the key", async () => {
    const server = await brokenEcho();
    try {
      const client = new IdentityClient({ baseUrl: server.url, writeKey: KEY, maxRetries: 0 });
      for (const [call, secrets] of [
        [() => client.exchange(TOKEN), [KEY, BASIC, TOKEN]],
        [
          () => client.prepare({ ...params, anonymousId: "visitor-0042-vísitor", userId: "josé.garcía@example.com" }),
          [KEY, BASIC, "visitor-0042", "josé", "garc"],
        ],
      ]) {
        await assert.rejects(call(), (error) => {
          assert.equal(error.name, "IdentityConnectionError");
          const shown = inspect(error, { depth: null });
          assert.match(shown, /HPE_/); // the parser's code is kept, for debugging
          for (const secret of secrets) assert.ok(!shown.includes(secret), shown);
          assert.ok(!JSON.stringify(error).includes(TOKEN));
          return true;
        });
      }
    } finally {
      await server.close();
    }
  });
});

describe("an error answer without a problem type: the class by status, as in Python", () => {
  const EXPECTED = {
    400: APIError,
    401: Unauthorized,
    403: APIError,
    404: APIError,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
    500: APIError,
    502: APIError,
    503: ServiceUnavailable,
  };
  const BODIES = {
    text: "<html>nope</html>",
    "about:blank": JSON.stringify({ type: "about:blank", title: "Nope" }),
    "another type": JSON.stringify({ type: "https://proxy.example/problem", title: "Nope" }),
    "an unknown slug": JSON.stringify({ type: "urn:identity-service:problem:constructor", title: "Nope" }),
  };

  test("Node's classes", async () => {
    for (const [status, cls] of Object.entries(EXPECTED)) {
      for (const [what, body] of Object.entries(BODIES)) {
        await withServer(Number(status), body, async (client) => {
          await assert.rejects(client.exchange(TOKEN), (error) => {
            assert.equal(error.constructor, cls, `${status} ${what}: ${error.name}`);
            assert.equal(error.status, Number(status));
            if (cls === RateLimited || cls === ServiceUnavailable) assert.equal(error.retryAfter, 7);
            return true;
          });
        }, { "retry-after": "7" });
      }
    }
  });

  test("a problem type of the service wins over the status", async () => {
    const body = { type: "urn:identity-service:problem:token-not-found", title: "Not found" };
    await withServer(401, body, (client) => assert.rejects(client.exchange(TOKEN), TokenNotFound));
  });

  test("the Python SDK picks the same class for the same answer", async () => {
    // One server for every case: /<status>/<body>/v1/handoffs/exchange.
    const names = Object.keys(BODIES);
    const server = await startHttpServer((req, res) => {
      const [, status, which] = req.url.split("/");
      res.writeHead(Number(status), { "content-type": "application/json", "retry-after": "7" });
      res.end(BODIES[names[Number(which)]]);
    });
    try {
      const bases = Object.keys(EXPECTED).flatMap((status) => names.map((_, which) => `${server.url}/${status}/${which}`));
      const python = await pythonExchanges(bases);
      assert.equal(python.length, bases.length);
      for (const [index, base] of bases.entries()) {
        const client = new IdentityClient({ baseUrl: base, writeKey: "write-key-0123456789" });
        await assert.rejects(client.exchange(TOKEN), (error) => {
          assert.equal(error.name, python[index][0], base);
          return true;
        });
      }
    } finally {
      await server.close();
    }
  });
});

describe("exchange answers without an anonymousId, as in Python", () => {
  // Each is what the Python SDK's `_identity` reads too: an identity, or a malformed answer.
  const ANSWERS = [
    { ...EXCHANGED, anonymousId: null, userId: "u-1" },
    { userId: "u-1" },
    { ...EXCHANGED, anonymousId: null, userId: null },
    { ...EXCHANGED, anonymousId: null, userId: "" },
    { ...EXCHANGED, anonymousId: "", userId: "u-1" },
    { ...EXCHANGED, anonymousId: 7, userId: "u-1" },
    {},
    EXCHANGED,
  ];

  test("the Python SDK accepts and refuses the same answers, with the same ids", async () => {
    // One server for every case: /<index>/v1/handoffs/exchange.
    const server = await startHttpServer((req, res) => {
      const [, which] = req.url.split("/");
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(ANSWERS[Number(which)]));
    });
    try {
      const bases = ANSWERS.map((_, which) => `${server.url}/${which}`);
      const python = await pythonExchanges(bases);
      const node = [];
      for (const base of bases) {
        const client = new IdentityClient({ baseUrl: base, writeKey: "write-key-0123456789" });
        try {
          const identity = await client.exchange(TOKEN);
          node.push(["identity", identity.anonymousId, identity.userId]);
        } catch (error) {
          node.push([error.name, error.title]);
        }
      }
      assert.deepEqual(node, python);
      // And what they agree on: only the first two are identities.
      assert.deepEqual(
        node.map(([what]) => what),
        ["identity", "identity", "APIError", "APIError", "APIError", "APIError", "APIError", "identity"],
      );
    } finally {
      await server.close();
    }
  });
});

describe("a redirect is never followed, as the Python SDK's", () => {
  // A 307 or 308 (a gateway, a moved service) would have fetch send the body again, to
  // wherever it points: an exchange's single-use token a second time (an exchange is never
  // retried), the token, the visitor's ids and the write key to another host.
  for (const status of [307, 308]) {
    test(`a ${status}: an APIError of its status, nothing sent where it points, also with the caller's fetch`, async () => {
      const elsewhere = await startHttpServer((req, res) => {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify(req.url.endsWith("/exchange") ? EXCHANGED : PREPARED));
      });
      const server = await startHttpServer((req, res) => {
        res.writeHead(status, { location: `${elsewhere.url}${req.url}` });
        res.end();
      });
      const seen = [];
      try {
        for (const fetchOption of [undefined, (url, init) => (seen.push(init.redirect), fetch(url, init))]) {
          const client = new IdentityClient({ baseUrl: server.url, writeKey: "write-key-0123456789", maxRetries: 0, fetch: fetchOption });
          for (const call of [() => client.prepare(params), () => client.exchange(TOKEN)]) {
            await assert.rejects(call(), (error) => {
              assert.ok(error instanceof APIError, String(error));
              assert.equal(error.status, status);
              return true;
            });
          }
        }
        assert.equal(elsewhere.count, 0);
        assert.deepEqual(seen, ["manual", "manual"]);
      } finally {
        await server.close();
        await elsewhere.close();
      }
    });
  }
});
