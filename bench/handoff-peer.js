// What the Node peers (fastify/, express/) share: prepare and exchange as a Node team writes
// them with ioredis and @segment/analytics-node, apart from the web framework. Same requests,
// answers and events as identity-service, none of its guarantees (no sealing, no outbox:
// events live in the process until flushed). Each peer passes its own ioredis and
// analytics-node (from its node_modules) and its ioredis options.
// PORT, REDIS_URL, WRITE_KEY, ORIGIN, SEGMENT_HOST, SEGMENT_WRITE_KEY from the environment.
const crypto = require("node:crypto");

function handoffPeer(Redis, Analytics, redisOptions = {}) {
  const env = process.env;
  const authorization = `Bearer ${env.WRITE_KEY}`;
  const allowedOrigin = env.ORIGIN;
  const redis = new Redis(env.REDIS_URL, redisOptions);
  const analytics = new Analytics({
    writeKey: env.SEGMENT_WRITE_KEY,
    host: env.SEGMENT_HOST,
    path: "/v1/batch",
    flushAt: 100,
    flushInterval: 500,
  });

  // Each returns [status, answer].
  async function prepare(body) {
    const { anonymousId, userId = null, traits = {}, context = {}, consent = {}, destination } =
      body ?? {};
    let url;
    try {
      url = new URL(destination);
    } catch {
      return [400, { title: "destination must be a URL" }];
    }
    if (url.origin !== allowedOrigin) return [403, { title: "not allowed" }];
    const token = crypto.randomBytes(32).toString("base64url");
    const record = { anonymousId, userId, traits, context, consent, destination };
    await redis.set(`handoff:${token}`, JSON.stringify(record), "EX", 300);
    analytics.track({ anonymousId, userId, event: "Cross-Domain Handoff Started", context });
    url.searchParams.set("handoff_token", token);
    const expiresAt = new Date(Date.now() + 300_000).toISOString();
    return [201, { token, expiresIn: 300, expiresAt, redirectUrl: url.toString() }];
  }

  async function exchange(body) {
    const token = body?.token;
    if (typeof token !== "string") return [400, { title: "token is required" }];
    const stored = await redis.getdel(`handoff:${token}`);
    if (stored === null) return [404, { title: "unknown token" }];
    const record = JSON.parse(stored);
    const { anonymousId, userId, traits, context } = record;
    analytics.track({ anonymousId, userId, event: "Cross-Domain Handoff Completed", context });
    if (userId) analytics.identify({ anonymousId, userId, traits, context });
    return [200, { ...record, source: "handoff" }];
  }

  // On SIGTERM (the benchmark's stop): close the server, deliver what is queued, exit.
  function stopOnSigterm(closeServer) {
    process.on("SIGTERM", async () => {
      await closeServer();
      await analytics.closeAndFlush();
      redis.disconnect();
      process.exit(0);
    });
  }

  return {
    authorized: (header) => header === authorization,
    unauthorized: { title: "Unauthorized" },
    port: Number(env.PORT),
    prepare,
    exchange,
    stopOnSigterm,
  };
}

module.exports = { handoffPeer };
