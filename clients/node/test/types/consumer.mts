// Type-checks the built declarations as an ESM consumer (import condition) sees them.
import { IdentityClient, TokenNotFound, handoffMiddleware, type Identity } from "@identity-service/client";
const c = new IdentityClient({ baseUrl: "http://x", writeKey: "k" });
const p: Promise<Identity> = c.exchange("t", { fallback: true });
const m = handoffMiddleware(c, { sameSite: "Lax" });
void p; void m; void TokenNotFound;
