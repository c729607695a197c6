// The speed-minded peer: the handoff (../handoff-peer.js) served as a Node team after
// throughput writes it: Fastify 5, ioredis with auto-pipelining (GETDEL for the exchange),
// the prepare answer serialized from its schema, @segment/analytics-node.
const Fastify = require("fastify");
const Redis = require("ioredis");
const { Analytics } = require("@segment/analytics-node");
const { handoffPeer } = require("../handoff-peer.js");

const peer = handoffPeer(Redis, Analytics, { enableAutoPipelining: true });
const app = Fastify({ logger: false, bodyLimit: 16 * 1024 });

app.addHook("onRequest", async (req, reply) => {
  if (!peer.authorized(req.headers.authorization)) {
    return reply.code(401).send(peer.unauthorized);
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
  const [status, answer] = await peer.prepare(req.body);
  return reply.code(status).send(answer);
});

app.post("/v1/handoffs/exchange", async (req, reply) => {
  const [status, answer] = await peer.exchange(req.body);
  return reply.code(status).send(answer);
});

app.listen({ port: peer.port, host: "127.0.0.1" });
peer.stopOnSigterm(() => app.close());
