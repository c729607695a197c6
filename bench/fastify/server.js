// The speed-minded baseline: the Express peer's prepare/exchange (same requests, answers and
// events) as a Node team after throughput writes it: Fastify 5, ioredis with auto-pipelining,
// GETDEL for the single use, a serializer compiled from the prepare answer's schema,
// @segment/analytics-node. None of identity-service's guarantees (no sealing, no outbox:
// events live in the process until flushed).
// PORT, REDIS_URL, WRITE_KEY, ORIGIN, SEGMENT_HOST, SEGMENT_WRITE_KEY from the environment.
const crypto = require("node:crypto");
const Fastify = require("fastify");
const Redis = require("ioredis");
const { Analytics } = require("@segment/analytics-node");

const auth = `Bearer ${process.env.WRITE_KEY}`;
const allowedOrigin = process.env.ORIGIN;
const redis = new Redis(process.env.REDIS_URL, { enableAutoPipelining: true });
const analytics = new Analytics({
  writeKey: process.env.SEGMENT_WRITE_KEY,
  host: process.env.SEGMENT_HOST,
  path: "/v1/batch",
  flushAt: 100,
  flushInterval: 500,
});
const app = Fastify({ logger: false, bodyLimit: 16 * 1024 });

app.addHook("onRequest", async (req, reply) => {
  if (req.headers.authorization !== auth) {
    return reply.code(401).send({ title: "Unauthorized" });
  }
});

const prepared = {
  201: {
    type: "object",
    properties: {
      token: { type: "string" },
      expiresIn: { type: "integer" },
      expiresAt: { type: "string" },
      redirectUrl: { type: "string" },
    },
  },
};

app.post("/v1/handoffs", { schema: { response: prepared } }, async (req, reply) => {
  const { anonymousId, userId = null, traits = {}, context = {}, consent = {}, destination } =
    req.body ?? {};
  let url;
  try {
    url = new URL(destination);
  } catch {
    return reply.code(400).send({ title: "destination must be a URL" });
  }
  if (url.origin !== allowedOrigin) return reply.code(403).send({ title: "not allowed" });
  const token = crypto.randomBytes(32).toString("base64url");
  const record = { anonymousId, userId, traits, context, consent, destination };
  await redis.set(`handoff:${token}`, JSON.stringify(record), "EX", 300);
  analytics.track({ anonymousId, userId, event: "Cross-Domain Handoff Started", context });
  url.searchParams.set("handoff_token", token);
  const expiresAt = new Date(Date.now() + 300_000).toISOString();
  return reply.code(201).send({ token, expiresIn: 300, expiresAt, redirectUrl: url.toString() });
});

app.post("/v1/handoffs/exchange", async (req, reply) => {
  const token = req.body?.token;
  if (typeof token !== "string") return reply.code(400).send({ title: "token is required" });
  const stored = await redis.getdel(`handoff:${token}`);
  if (stored === null) return reply.code(404).send({ title: "unknown token" });
  const record = JSON.parse(stored);
  const { anonymousId, userId, traits, context } = record;
  analytics.track({ anonymousId, userId, event: "Cross-Domain Handoff Completed", context });
  if (userId) analytics.identify({ anonymousId, userId, traits, context });
  return { ...record, source: "handoff" };
});

app.listen({ port: Number(process.env.PORT), host: "127.0.0.1" });
process.on("SIGTERM", async () => {
  await app.close();
  await analytics.closeAndFlush();
  redis.disconnect();
  process.exit(0);
});
