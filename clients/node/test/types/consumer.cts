// Type-checks the built declarations as a CommonJS consumer (require condition) sees them.
import { IdentityClient, TokenNotFound, handoffMiddleware, type Identity, type RequestIdentity } from "@identity-service/client";
const c = new IdentityClient({ baseUrl: "http://x", writeKey: "k" });
const p: Promise<Identity> = c.exchange("t", { fallback: true });
const m = handoffMiddleware(c, { sameSite: "Lax" });
// Null for a handoff prepared with a userId alone.
const id: Promise<string | null> = p.then((identity) => identity.anonymousId);
const seen = (identity: RequestIdentity): string | null => identity.anonymousId;
void p; void m; void TokenNotFound; void id; void seen;
