// The tutorial peer: the handoff (../handoff-peer.js) served as a tutorial writes it with
// Express 5, ioredis and @segment/analytics-node.
const express = require("express");
const Redis = require("ioredis");
const { Analytics } = require("@segment/analytics-node");
const { handoffPeer } = require("../handoff-peer.js");

const peer = handoffPeer(Redis, Analytics);
const app = express();
app.use(express.json({ limit: "16kb" }));

app.use((req, res, next) => {
  if (!peer.authorized(req.get("authorization"))) {
    return res.status(401).json(peer.unauthorized);
  }
  next();
});

app.post("/v1/handoffs", async (req, res) => {
  const [status, answer] = await peer.prepare(req.body);
  res.status(status).json(answer);
});

app.post("/v1/handoffs/exchange", async (req, res) => {
  const [status, answer] = await peer.exchange(req.body);
  res.status(status).json(answer);
});

const server = app.listen(peer.port, "127.0.0.1");
peer.stopOnSigterm(() => server.close());
