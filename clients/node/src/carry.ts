/**
 * The carry cookie: the exchanged identity, signed, for the request after the 303.
 *
 * The middleware answers the handoff request with a 303, so the handler that renders the
 * page runs on the next request, which only has the visitor cookie. The carry cookie brings
 * the rest of the exchanged identity (userId, traits, consent, source) to that request:
 * `base64url(compact JSON) "." base64url(HMAC-SHA256)`, under a key derived from the write
 * key. Signed, not encrypted: the browser can read it (HttpOnly keeps page scripts out).
 * The same format as the Python SDK's (identity_client/_carry.py); both suites check the
 * vectors of clients/carry-vectors.json.
 */
import { createHmac, timingSafeEqual } from "node:crypto";

import type { Identity, JsonObject } from "./client.js";

const KEY_LABEL = "identity-service-client carry cookie v1";
/**
 * Browsers keep about 4 KB per cookie, but servers refuse a Cookie header line over about
 * 8 KB (aiohttp 8190 bytes, nginx 8k) before any middleware runs, and the carry cookie
 * shares that line with the site's other cookies. The Python SDK's MAX_VALUE_BYTES is the same.
 */
export const MAX_CARRY_BYTES = 1500;

/** What the carry cookie holds. */
export interface CarriedIdentity {
  anonymousId: string;
  userId: string | null;
  traits: JsonObject;
  consent: Record<string, boolean>;
  source: "handoff" | "generated";
}

/**
 * The carry cookie's `SameSite` for a visitor cookie's `visitorSameSite` (default `Lax`): the
 * same, except `Lax` for `Strict` (any case). The request after the landing's 303 is the tail
 * of a navigation another site started, and browsers send no `Strict` cookie with it, so a
 * `Strict` carry cookie would miss the one request it is for. `Lax` is sent on a cross-site
 * top-level GET, which that request is; the cookie is HttpOnly, signed, 60 s and cleared when
 * read (docs/sdk-node.md). The Python SDK's `_carry.same_site` is the same.
 */
export function carrySameSite(visitorSameSite = "Lax"): string {
  return visitorSameSite.toLowerCase() === "strict" ? "Lax" : visitorSameSite;
}

/** The signing key of the carry cookie, derived from (and never equal to) the write key. */
export function carryKey(writeKey: string): Buffer {
  return createHmac("sha256", writeKey).update(KEY_LABEL).digest();
}

function sign(key: Uint8Array, payload: string): string {
  return createHmac("sha256", key).update(payload).digest("base64url");
}

/**
 * The cookie value for `identity` valid until `expires` (Unix seconds), or null when too large.
 * Only an identity with an anonymousId is carried: the cookie is read only for the visitor
 * cookie's anonymousId, so the middleware carries none for a handoff prepared with a userId
 * alone (nor does the Python SDK's), and `decodeCarry` refuses one without it.
 */
export function encodeCarry(
  identity: Identity & { anonymousId: string },
  key: Uint8Array,
  expires: number,
): string | null {
  const document = {
    anonymousId: identity.anonymousId,
    userId: identity.userId,
    traits: identity.traits ?? {},
    consent: identity.consent ?? {},
    source: identity.source,
    exp: expires,
  };
  const payload = Buffer.from(JSON.stringify(document), "utf8").toString("base64url");
  const value = `${payload}.${sign(key, payload)}`;
  return value.length <= MAX_CARRY_BYTES ? value : null;
}

const isObject = (value: unknown): value is JsonObject =>
  value !== null && typeof value === "object" && !Array.isArray(value);

/** The identity in a carry cookie `value`, or null when forged, expired, malformed or oversized. Never throws. */
export function decodeCarry(value: string, key: Uint8Array, nowSeconds: number): CarriedIdentity | null {
  if (value.length > MAX_CARRY_BYTES) return null;
  const dot = value.indexOf(".");
  if (dot < 0) return null;
  const payload = value.slice(0, dot);
  const given = Buffer.from(value.slice(dot + 1), "utf8");
  const expected = Buffer.from(sign(key, payload), "utf8");
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) return null;
  let document: unknown;
  try {
    document = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
  } catch {
    return null;
  }
  if (!isObject(document)) return null;
  const { anonymousId, userId, traits, consent, source, exp } = document;
  if (
    typeof anonymousId !== "string" ||
    anonymousId === "" ||
    (userId !== null && typeof userId !== "string") ||
    !isObject(traits) ||
    !isObject(consent) ||
    (source !== "handoff" && source !== "generated") ||
    typeof exp !== "number" ||
    !(exp > nowSeconds)
  ) {
    return null;
  }
  return { anonymousId, userId, traits, consent: consent as Record<string, boolean>, source };
}
