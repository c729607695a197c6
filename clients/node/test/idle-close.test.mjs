// A kept-alive connection the server closes as the next request goes out on it (the front at
// its connection limit, nginx at its keepalive_timeout): the client sends that request again,
// once, on a new connection, and nothing else is retried. A real loopback server (node:net)
// that counts what it gets, as the Python SDK's tests/idle_close.py.
import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";

import { IdentityClient, IdentityConnectionError } from "../dist/esm/index.js";
import { WRITE_KEY as SERVICE_WRITE_KEY, startService } from "./helpers.mjs";

const WRITE_KEY = "idle-close-write-key-0123456789";
const PREPARE = "/v1/handoffs";
const EXCHANGE = "/v1/handoffs/exchange";

/** The service's answer to a prepare or an exchange (the exchanged token as the id). */
function answerTo(path, body) {
  const data =
    path === PREPARE
      ? {
          token: `token-${JSON.parse(body).anonymousId}`,
          redirectUrl: "https://b.example.com/?handoff_token=t",
          expiresAt: "2030-01-01T00:00:00.000Z",
          expiresIn: 300,
        }
      : { anonymousId: `from-${JSON.parse(body).token}`, source: "handoff" };
  const content = JSON.stringify(data);
  const status = path === PREPARE ? "201 Created" : "200 OK";
  return `HTTP/1.1 ${status}\r\nContent-Type: application/json\r\nContent-Length: ${content.length}\r\n\r\n${content}`;
}

/**
 * What the server does with request `number` of connection `connection` (both from 1) under
 * `rule`: "second" reads the second request of a connection then closes it (FIN, no byte of
 * answer); "arrival" resets it as it arrives, unread; "partial" answers its head and half its
 * body, then closes; "first" closes the first request of the first connection (a fresh one);
 * "after-first" closes every request but that one. Anything else is answered, kept alive.
 */
function action(rule, connection, number) {
  if (rule === "after-first") return connection === 1 && number === 1 ? "answer" : "close";
  if (rule === "first") return connection === 1 && number === 1 ? "close" : "answer";
  if (number !== 2) return "answer";
  return { second: "close", arrival: "reset", partial: "partial" }[rule];
}

async function idleCloser(rule) {
  const requests = [];
  const sockets = new Set();
  let connections = 0;
  const server = net.createServer((socket) => {
    connections += 1;
    const connection = connections;
    let number = 0;
    let pending = "";
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
    socket.on("data", (chunk) => {
      if (pending === "" && action(rule, connection, number + 1) === "reset") {
        number += 1;
        requests.push({ connection, number, path: chunk.toString("latin1").split(" ")[1], body: "" });
        socket.resetAndDestroy();
        return;
      }
      pending += chunk.toString("latin1");
      const end = pending.indexOf("\r\n\r\n");
      if (end < 0) return;
      const length = Number(/\r\ncontent-length: *(\d+)/i.exec(pending.slice(0, end))?.[1] ?? 0);
      if (pending.length < end + 4 + length) return;
      const path = pending.split(" ")[1];
      const body = pending.slice(end + 4, end + 4 + length);
      pending = pending.slice(end + 4 + length);
      number += 1;
      requests.push({ connection, number, path, body });
      const todo = action(rule, connection, number);
      if (todo === "close") return void socket.end();
      const answer = answerTo(path, body);
      if (todo === "partial") {
        const at = answer.indexOf("\r\n\r\n") + 4;
        return void socket.end(answer.slice(0, at + Math.floor((answer.length - at) / 2)));
      }
      socket.write(answer);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    places: () => requests.map((r) => [r.connection, r.number, r.path]),
    get connections() {
      return connections;
    },
    close() {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/**
 * `calls` ([name, value]) one after the other on one client, with no retry of prepare's own
 * (`maxRetries: 0`): each outcome, an IdentityConnectionError as a value. A pause before each
 * call gives the kept-alive socket back to fetch's pool (Node 20's fetch opens a second one
 * for a call made right after the first), so the next call goes on it.
 */
async function run(url, calls) {
  const client = new IdentityClient({ baseUrl: url, writeKey: WRITE_KEY, maxRetries: 0 });
  const out = [];
  for (const [name, value] of calls) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    try {
      out.push(
        name === "prepare"
          ? await client.prepare({ anonymousId: value, destination: "https://b.example.com/cart" })
          : await client.exchange(value, { fallback: true }),
      );
    } catch (error) {
      if (!(error instanceof IdentityConnectionError)) throw error;
      out.push(error);
    }
  }
  return out;
}

/** Run `body` against an `idleCloser(rule)` server, closed afterwards whatever happens. */
async function withIdleCloser(rule, body) {
  const server = await idleCloser(rule);
  try {
    await body(server);
  } finally {
    await server.close();
  }
}

for (const rule of ["second", "arrival"]) {
  test(`an exchange on a kept-alive connection closed unanswered (${rule}) is sent again once, on a new connection`, async () => {
    await withIdleCloser(rule, async (server) => {
      const [prepared, identity] = await run(server.url, [
        ["prepare", "a"],
        ["exchange", "token-a"],
      ]);
      assert.equal(prepared.token, "token-a");
      assert.equal(identity.anonymousId, "from-token-a");
      assert.equal(identity.source, "handoff");
      assert.deepEqual(server.places(), [
        [1, 1, PREPARE],
        [1, 2, EXCHANGE],
        [2, 1, EXCHANGE],
      ]);
      if (rule === "second") assert.equal(server.requests[2].body, server.requests[1].body);
      assert.equal(server.connections, 2);
    });
  });

  test(`a prepare on a kept-alive connection closed unanswered (${rule}) is sent again once (not prepare's own retry)`, async () => {
    await withIdleCloser(rule, async (server) => {
      const [first, second] = await run(server.url, [
        ["prepare", "a"],
        ["prepare", "b"],
      ]);
      assert.equal(first.token, "token-a");
      assert.equal(second.token, "token-b");
      assert.deepEqual(server.places(), [
        [1, 1, PREPARE],
        [1, 2, PREPARE],
        [2, 1, PREPARE],
      ]);
    });
  });
}

test("a fresh connection closed unanswered is not retried: the usual connection error", async () => {
  await withIdleCloser("first", async (server) => {
    const [failed, prepared] = await run(server.url, [
      ["exchange", "t"],
      ["prepare", "b"],
    ]);
    assert.ok(failed instanceof IdentityConnectionError);
    assert.ok(!failed.message.includes(WRITE_KEY));
    assert.equal(prepared.token, "token-b");
    assert.deepEqual(server.places(), [
      [1, 1, EXCHANGE],
      [2, 1, PREPARE],
    ]);
  });
});

for (const operation of ["prepare", "exchange"]) {
  const path = operation === "prepare" ? PREPARE : EXCHANGE;

  test(`a server that closes every time gets one retry of ${operation === "prepare" ? "a" : "an"} ${operation}, then the usual error`, async () => {
    await withIdleCloser("after-first", async (server) => {
      const [first, failed] = await run(server.url, [
        ["prepare", "a"],
        [operation, "token-a"],
      ]);
      assert.equal(first.token, "token-a");
      assert.ok(failed instanceof IdentityConnectionError);
      assert.deepEqual(server.places(), [
        [1, 1, PREPARE],
        [1, 2, path],
        [2, 1, path],
      ]);
    });
  });

  test(`${operation === "prepare" ? "a" : "an"} ${operation} whose answer is cut short is not retried`, async () => {
    await withIdleCloser("partial", async (server) => {
      const [first, failed] = await run(server.url, [
        ["prepare", "a"],
        [operation, "token-a"],
      ]);
      assert.equal(first.token, "token-a");
      assert.ok(failed instanceof IdentityConnectionError);
      assert.deepEqual(server.places(), [
        [1, 1, PREPARE],
        [1, 2, path],
      ]);
    });
  });
}

/** Another client of the service: a connection, one `GET /healthz` answered, kept open. */
function crowd(port) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write("GET /healthz HTTP/1.1\r\nHost: crowd\r\n\r\n"));
    let head = "";
    socket.on("error", reject);
    socket.on("data", (chunk) => {
      head += chunk.toString("latin1");
      if (head.includes("\r\n\r\n")) {
        assert.match(head, /^HTTP\/1\.1 200 /);
        resolve(socket);
      }
    });
  });
}

test("end to end: the service closing the pooled connection for a new one as the exchange goes out keeps the identity", async () => {
  // The real service holds one connection at most (IDENTITY_MAX_CONNECTIONS=1): a new one
  // closes the one kept alive. A loopback TCP proxy between the client and the service only
  // sets the timing: it holds the exchange's bytes on the kept-alive connection while another
  // client connects (so the service has read nothing of it when it closes that connection),
  // then passes the service's close on. Without the retry: an IdentityConnectionError (the
  // middleware's generated fallback: the identity lost).
  const service = await startService({ IDENTITY_MAX_CONNECTIONS: "1" });
  const sockets = new Set();
  const others = [];
  let connections = 0;
  const proxy = net.createServer((client) => {
    connections += 1;
    const number = connections;
    const upstream = net.connect(service.port, "127.0.0.1");
    let posts = 0;
    let crowded = number === 1 ? null : Promise.resolve();
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on("error", () => {});
      socket.on("close", () => sockets.delete(socket));
    }
    upstream.on("data", (chunk) => client.write(chunk));
    // The close, once the other client was served (else the retry could come first and meet
    // the limit: a 503).
    upstream.on("end", async () => {
      await crowded;
      client.end();
    });
    client.on("data", (chunk) => {
      if (chunk.toString("latin1").startsWith("POST ")) posts += 1;
      if (number === 1 && posts === 2) {
        crowded ??= crowd(service.port).then((socket) => void others.push(socket));
        return; // held: the service closes this connection having read nothing of it
      }
      upstream.write(chunk);
    });
    client.on("end", () => upstream.end());
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  try {
    const client = new IdentityClient({
      baseUrl: `http://127.0.0.1:${proxy.address().port}`,
      writeKey: SERVICE_WRITE_KEY,
      maxRetries: 0,
    });
    const prepared = await client.prepare({ anonymousId: "kept-e2e", destination: "http://checkout.localhost/cart" });
    await new Promise((resolve) => setTimeout(resolve, 50)); // the socket back in fetch's pool
    const identity = await client.exchange(prepared.token, { fallback: true });
    assert.equal(identity.anonymousId, "kept-e2e");
    assert.equal(identity.source, "handoff");
    assert.equal(connections, 2); // the exchange again, on a new connection
  } finally {
    for (const socket of [...sockets, ...others]) socket.destroy();
    await new Promise((resolve) => proxy.close(resolve));
    await service.stop();
  }
});
