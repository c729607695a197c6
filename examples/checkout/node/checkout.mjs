// Domain B, the checkout, in Node (express.localhost): Express 5 and the Node SDK's middleware
// (clients/node, docs/sdk-node.md). Like checkout.py's middleware build: the token is exchanged
// before any page runs, the ajs_anonymous_id cookie is set and the visitor gets a 303 to the
// clean URL, so the page has no handoff code at all.
//
// demo.py starts it (`node checkout.mjs`) with IDENTITY_URL and IDENTITY_WRITE_KEY (this
// checkout's source), HOST and PORT, COOKIE_SAME_SITE (the visitor cookie's SameSite, Lax
// when unset), and CHECKOUT_PAGE: the cart page in the demo's shared layout (pages.py), whose
// __SERVER_SOURCE__ this app fills in. It prints "listening" once up.
import express from "express";
import { IdentityClient, handoffMiddleware } from "@identity-service/client";

const page = process.env.CHECKOUT_PAGE ?? "";
const escape = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const app = express();
// http on loopback in the demo: a Secure cookie would need https.
const sameSite = process.env.COOKIE_SAME_SITE || "Lax";
app.use(handoffMiddleware(new IdentityClient(), { secure: false, sameSite, event: "Checkout Started" }));
app.get("/cart", (req, res) => {
  // An Identity restored from the handoff or the cookie, or undefined for a new visitor.
  const seen = req.identity?.source ?? "none";
  res.set({ "Cache-Control": "no-store", "Referrer-Policy": "strict-origin-when-cross-origin" });
  res.type("html").send(page.replace("__SERVER_SOURCE__", escape(seen)));
});

// Express 5 calls back with the error when the port cannot be listened on (taken...).
const server = app.listen(Number(process.env.PORT), process.env.HOST ?? "127.0.0.1", (error) => {
  if (error) {
    console.error(`checkout.mjs: ${error.message}`);
    process.exit(1);
  }
  console.log("listening");
});
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections(); // the browser's keep-alive connections too
  });
}
