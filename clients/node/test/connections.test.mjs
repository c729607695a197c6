// Connection reuse: the client's calls to the real service go through a counting TCP proxy on
// loopback; sequential calls share the kept-alive connections of Node's fetch pool.
import assert from "node:assert/strict";
import net from "node:net";
import { after, before, test } from "node:test";

import { IdentityClient } from "../dist/esm/index.js";
import { WRITE_KEY, startService } from "./helpers.mjs";

let service;
before(async () => {
  service = await startService();
});
after(async () => {
  await service?.stop();
});

/** A TCP proxy to `port` that counts the connections it accepts. */
async function countingProxy(port) {
  const sockets = new Set();
  let accepted = 0;
  const server = net.createServer((client) => {
    accepted += 1;
    const upstream = net.connect(port, "127.0.0.1");
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on("error", () => {});
      socket.on("close", () => sockets.delete(socket));
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    accepted: () => accepted,
    close: () => {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

test("sequential prepares and exchanges reuse the pool's connections", async () => {
  const proxy = await countingProxy(service.port);
  try {
    const client = new IdentityClient({ baseUrl: proxy.url, writeKey: WRITE_KEY });
    for (let n = 0; n < 10; n += 1) {
      const handoff = await client.prepare({ anonymousId: `reused-${n}`, destination: "http://checkout.localhost/cart" });
      assert.equal((await client.exchange(handoff.token)).anonymousId, `reused-${n}`);
    }
    // Node 20's fetch (undici) opens a second socket for the call right after the first
    // (the first socket is not back in the pool yet); from then on both are reused: 20
    // calls, 2 connections (20 without keep-alive).
    assert.ok(proxy.accepted() <= 2, `${proxy.accepted()} connections for 20 calls`);
  } finally {
    await proxy.close();
  }
});
