// A real service whose Redis does not answer: every /v1 call answers 503 service-unavailable.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { IdentityClient, IdentityError, ServiceUnavailable } from "../dist/esm/index.js";
import { WRITE_KEY, freePort, startService } from "./helpers.mjs";

let service;
before(async () => {
  const redisPort = await freePort(); // nothing listens there
  service = await startService({
    IDENTITY_REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    IDENTITY_SECRET: "s".repeat(40),
  });
});
after(async () => {
  await service?.stop();
});

test("prepare and exchange map the real 503 to ServiceUnavailable with retryAfter", async () => {
  const client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY, maxRetries: 0 });
  await assert.rejects(client.prepare({ anonymousId: "a", destination: "http://checkout.localhost/" }), (error) => {
    assert.ok(error instanceof ServiceUnavailable);
    assert.ok(error instanceof IdentityError);
    assert.equal(error.status, 503);
    assert.equal(error.type, "urn:identity-service:problem:service-unavailable");
    assert.equal(error.retryAfter, 1);
    assert.equal(error.instance, "/v1/handoffs");
    return true;
  });
  await assert.rejects(client.exchange("t".repeat(43), { fallback: true }), ServiceUnavailable);
});

test("prepare retries the real 503 up to maxRetries, then throws it", async () => {
  const client = new IdentityClient({ baseUrl: service.url, writeKey: WRITE_KEY, maxRetries: 2, maxBackoffMs: 20 });
  const started = Date.now();
  await assert.rejects(client.prepare({ anonymousId: "a", destination: "http://checkout.localhost/" }), ServiceUnavailable);
  assert.ok(Date.now() - started >= 30, "two capped backoffs were waited");
});
