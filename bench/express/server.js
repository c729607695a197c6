// The baseline: prepare/exchange as a tutorial writes it with Express 5, ioredis and
// @segment/analytics-node. Same requests, answers and events as identity-service, none of
// its guarantees (no sealing, no outbox: events live in the process until flushed).
// PORT, REDIS_URL, WRITE_KEY, ORIGIN, SEGMENT_HOST, SEGMENT_WRITE_KEY from the environment.
const crypto = require("node:crypto");
const express = require("express");
const Redis = require("ioredis");
const { Analytics } = require("@segment/analytics-node");

const redis = new Redis(process.env.REDIS_URL);
const analytics = new Analytics({
  writeKey: process.env.SEGMENT_WRITE_KEY,
  host: process.env.SEGMENT_HOST,
  path: "/v1/batch",
  flushAt: 100,
  flushInterval: 500,
});
const app = express();
app.use(express.json({ limit: "16kb" }));

app.use((req, res, next) => {
  if (req.get("authorization") !== `Bearer ${process.env.WRITE_KEY}`) {
    return res.status(401).json({ title: "Unauthorized" });
  }
  next();
});

app.post("/v1/handoffs", async (req, res) => {
  const { anonymousId, userId = null, traits = {}, context = {}, consent = {}, destination } =
    req.body ?? {};
  let url;
  try {
    url = new URL(destination);
  } catch {
    return res.status(400).json({ title: "destination must be a URL" });
  }
  if (url.origin !== process.env.ORIGIN) return res.status(403).json({ title: "not allowed" });
  const token = crypto.randomBytes(32).toString("base64url");
  const record = { anonymousId, userId, traits, context, consent, destination };
  await redis.set(`handoff:${token}`, JSON.stringify(record), "EX", 300);
  analytics.track({ anonymousId, userId, event: "Cross-Domain Handoff Started", context });
  url.searchParams.set("handoff_token", token);
  const expiresAt = new Date(Date.now() + 300_000).toISOString();
  res.status(201).json({ token, expiresIn: 300, expiresAt, redirectUrl: url.toString() });
});

app.post("/v1/handoffs/exchange", async (req, res) => {
  const token = req.body?.token;
  if (typeof token !== "string") return res.status(400).json({ title: "token is required" });
  const stored = await redis.getdel(`handoff:${token}`);
  if (stored === null) return res.status(404).json({ title: "unknown token" });
  const record = JSON.parse(stored);
  const { anonymousId, userId, traits, context } = record;
  analytics.track({ anonymousId, userId, event: "Cross-Domain Handoff Completed", context });
  if (userId) analytics.identify({ anonymousId, userId, traits, context });
  res.json({ ...record, source: "handoff" });
});

const server = app.listen(Number(process.env.PORT), "127.0.0.1");
process.on("SIGTERM", async () => {
  server.close();
  await analytics.closeAndFlush();
  redis.disconnect();
  process.exit(0);
});
