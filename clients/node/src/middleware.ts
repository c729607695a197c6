import { carrySameSite, decodeCarry, encodeCarry } from "./carry.js";
import type { ExchangeOptions, Identity, IdentityClient, JsonObject } from "./client.js";
import { ConfigurationError } from "./errors.js";

/** The parts of a Node/Express request the middleware reads (no express dependency). */
export interface MiddlewareRequest {
  method?: string;
  url?: string;
  /** Express: the URL before router mounting rewrote `url`. */
  originalUrl?: string;
  headers: Record<string, string | string[] | undefined>;
  /** Express: the client address, honouring `trust proxy`. */
  ip?: string;
  /** Express: `http` or `https`, honouring `trust proxy`. */
  protocol?: string;
  socket?: { remoteAddress?: string; encrypted?: boolean } | null;
  /** Set by the middleware: the visitor's identity, restored or read from the cookie. */
  identity?: RequestIdentity;
}

/** The parts of a Node/Express response the middleware writes. */
export interface MiddlewareResponse {
  statusCode: number;
  setHeader(name: string, value: string | number | readonly string[]): unknown;
  getHeader?(name: string): string | number | string[] | undefined;
  end(): unknown;
}

export type NextFunction = (error?: unknown) => void;

/**
 * `req.identity`. On the request after the handoff's 303 (the clean URL, the one a handler
 * renders): the exchanged identity, from the signed carry cookie (`source` `handoff` or
 * `generated`, with `userId`, `traits`, `consent`). On any other request: the visitor
 * cookie's anonymousId (`source: "cookie"`, no other field), or undefined without it.
 *
 * On the handoff request itself (answered 303, so seen only by code around the middleware,
 * e.g. a logger on the response's `finish`): the exchange's `anonymousId` and `source` with
 * `exchanged`, or the visitor cookie's when the visitor keeps it. For a handoff prepared
 * with a `userId` alone the exchange has no anonymousId: then, as in the Python SDK, it is
 * `{ anonymousId: null, source: "handoff", userId, traits, consent, exchanged }` (the
 * visitor cookie, if any, is left as it was, and no carry cookie is set).
 */
export interface RequestIdentity {
  /** Null only on the handoff request of a handoff prepared with a `userId` alone. */
  anonymousId: string | null;
  /** `handoff` / `generated`: from an exchange; `cookie`: read from the visitor cookie. */
  source: "handoff" | "generated" | "cookie";
  /** From the exchange (`handoff` / `generated` only). */
  userId?: string | null;
  traits?: JsonObject;
  consent?: Record<string, boolean>;
  /** The whole exchange answer, on the landing request (answered 303) only. */
  exchanged?: Identity;
}

export interface HandoffMiddlewareOptions {
  /**
   * Query parameter carrying the token (default `handoff_token`, the service's): ASCII
   * letters, digits, `_` or `-`, as the service's `IDENTITY_TOKEN_PARAM`; any other (an
   * empty one took every empty part of a query, `?a&&b`, for a handoff) is a
   * ConfigurationError from `handoffMiddleware`.
   */
  tokenParam?: string;
  /**
   * The visitor cookie (default `ajs_anonymous_id`, the one analytics.js reads): a token
   * (RFC 6265), as `carryCookieName`; one with a space, `;`, `,`, `=` or a control character
   * is a ConfigurationError from `handoffMiddleware`.
   */
  cookieName?: string;
  /**
   * Cookie `Domain` (e.g. `.example-pay.com`); default none (host-only). Not a domain name
   * (a `;`, a space, an empty label...): a ConfigurationError from `handoffMiddleware`.
   */
  cookieDomain?: string;
  /**
   * Cookie `Max-Age` in whole seconds (default one year), from 1 to 400 days (browsers cut a
   * longer one): any other (NaN, 0, 1.5) is a ConfigurationError from `handoffMiddleware`.
   */
  cookieMaxAge?: number;
  /**
   * Cookie `SameSite` (default `Lax`; any case); `None` needs `secure`. With `Strict` the
   * carry cookie is `Lax` (`carrySameSite`): the page after the 303 (still the navigation from
   * domain A) gets no `Strict` cookie, so the carry cookie alone gives `req.identity` there.
   */
  sameSite?: "Lax" | "Strict" | "None";
  /**
   * Cookie `Secure` (default true; false for plain-http development). A `__Secure-` or
   * `__Host-` name (in any case) needs it, and a `__Host-` one `cookiePath` `/` and no
   * `cookieDomain` (RFC 6265bis; the carry cookie is host-only anyway): browsers drop such a
   * cookie otherwise, so another combination is a ConfigurationError from `handoffMiddleware`.
   */
  secure?: boolean;
  /** Cookie `Path` (default `/`): starting with `/`, printable ASCII without `;`. */
  cookiePath?: string;
  /** Domain B's completion event name and properties, passed to the exchange. */
  event?: ExchangeOptions["event"];
  properties?: ExchangeOptions["properties"];
  /**
   * The public origin of this site (`https://checkout.example-pay.com`), used for the page
   * URL in the exchange's context. Default: from the request (Express's `req.protocol`, or
   * the socket, and the `Host` header). Not an http(s) origin (one with user information,
   * a path, a query or a fragment too): a ConfigurationError from `handoffMiddleware`.
   */
  publicOrigin?: string;
  /**
   * The cookie carrying the exchanged identity to the request after the 303 (default
   * `identity_restored`; HttpOnly, host-only, 60 s, signed with a key derived from the
   * write key).
   */
  carryCookieName?: string;
  /** Called with any error of an exchange (the visitor is redirected all the same). */
  onError?: (error: unknown, req: MiddlewareRequest) => void;
}

const ONE_YEAR = 365 * 24 * 60 * 60;
const DEFAULT_COOKIE_NAME = "ajs_anonymous_id";
const DEFAULT_CARRY_NAME = "identity_restored";
const CARRY_MAX_AGE = 60;
/** The service refuses (400) a token that is empty or longer; real tokens are 43 characters. */
const MAX_TOKEN_LENGTH = 128;
/** Exchanged instead of a token the service would refuse: no token is ever "-". */
const UNKNOWN_TOKEN = "-";

function header(req: MiddlewareRequest, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

function readRawCookie(req: MiddlewareRequest, name: string): string | undefined {
  const raw = header(req, "cookie");
  if (!raw) return undefined;
  for (const part of raw.split(";")) {
    const eq = part.indexOf("=");
    if (eq >= 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return undefined;
}

/** Reads one cookie from the request's Cookie header (plain, quoted or percent-encoded). */
export function readCookie(req: MiddlewareRequest, name: string): string | undefined {
  const raw = readRawCookie(req, name);
  if (raw === undefined) return undefined;
  let value = raw;
  if (value.startsWith('"') && value.endsWith('"') && value.length >= 2) value = value.slice(1, -1);
  try {
    value = decodeURIComponent(value);
  } catch {
    /* keep it as it is */
  }
  // analytics.js (classic) stores JSON.stringify(id); accept both forms.
  if (value.startsWith('"') && value.endsWith('"') && value.length >= 2) value = value.slice(1, -1);
  return value || undefined;
}

// A cookie's Domain (RFC 6265 5.2.3): a domain name, its leading dot allowed; labels of
// letters, digits, '-' (not at either end) and '_', 63 characters at most, 253 in all. The
// Python middlewares and identity.js check the same. Two labels at least, the last no
// number (NUMBER: to a browser, a name whose last label is one is an IPv4 address):
// browsers set no Domain cookie for a single label (localhost, .com) or an IP address, as
// the service's AMP cookie.domain refuses them. A public suffix of more labels (co.uk) is
// not checked.
const DOMAIN_LABEL = /^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$/;
const NUMBER = /^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$/;
const MAX_DOMAIN = 253;

/** Whether `domain` can be a cookie's `Domain` as it is. */
function isCookieDomain(domain: unknown): boolean {
  if (typeof domain !== "string") return false;
  const name = domain.startsWith(".") ? domain.slice(1) : domain;
  const labels = name.split(".");
  return (
    name.length <= MAX_DOMAIN &&
    labels.length > 1 &&
    labels.every((label) => DOMAIN_LABEL.test(label)) &&
    !NUMBER.test(labels[labels.length - 1])
  );
}

// A cookie's name (RFC 6265 4.1.1): a token, RFC 9110's tchar; a cookie's Path: any
// printable ASCII but ';', starting with '/' (5.2.4: a browser ignores any other Path and
// uses the page's directory). The Python middlewares check the same, identity.js the name.
const COOKIE_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
const COOKIE_PATH = /^\/[\x20-\x3a\x3c-\x7e]*$/;
// The token's query parameter: what the service's IDENTITY_TOKEN_PARAM may be. The Python
// middlewares and identity.js check the same.
const TOKEN_PARAM = /^[A-Za-z0-9_-]+$/;
/** The longest Max-Age browsers keep (RFC 6265bis 5.6.2: a longer one is cut to 400 days). */
const MAX_COOKIE_AGE = 400 * 24 * 3600;
const SAME_SITE = ["lax", "strict", "none"];

/**
 * Refuses, when the middleware is made, a `tokenParam` the service cannot send, and a
 * cookie option that written into the Set-Cookie as given would add attributes (a `;`),
 * make a cookie browsers drop or cut, or one Node refuses to send (a CR or LF: every
 * handoff request's error), as the Python SDK refuses them.
 */
function checkOptions(options: HandoffMiddlewareOptions): void {
  // An option left out (undefined or null) is its default.
  const refuse = (message: string): never => {
    throw new ConfigurationError(`handoffMiddleware: ${message}`);
  };
  const tokenParam: unknown = options.tokenParam;
  if (tokenParam != null && (typeof tokenParam !== "string" || !TOKEN_PARAM.test(tokenParam))) {
    refuse(
      `tokenParam ${JSON.stringify(tokenParam)} is not a parameter the service can send ` +
        "(ASCII letters, digits, '_' or '-', as IDENTITY_TOKEN_PARAM)",
    );
  }
  if (options.cookieDomain && !isCookieDomain(options.cookieDomain)) {
    refuse(
      `cookieDomain ${JSON.stringify(options.cookieDomain)} is not a domain name browsers set a cookie for ` +
        "(e.g. .example-pay.com; an internationalized one in its xn-- form; no single label such as " +
        "localhost, no IP address)",
    );
  }
  for (const option of ["cookieName", "carryCookieName"] as const) {
    const name: unknown = options[option];
    if (name != null && (typeof name !== "string" || !COOKIE_NAME.test(name))) {
      refuse(
        `${option} ${JSON.stringify(name)} is not a cookie name (letters, digits and ` +
          "!#$%&'*+-.^_`|~; no space, ';', ',', '=' or control character)",
      );
    }
  }
  const visitorName = options.cookieName ?? DEFAULT_COOKIE_NAME;
  if (visitorName === (options.carryCookieName ?? DEFAULT_CARRY_NAME)) {
    refuse(
      `cookieName and carryCookieName are both ${JSON.stringify(visitorName)}: the carry cookie ` +
        "(HttpOnly, 60 s) would replace the visitor cookie",
    );
  }
  const path: unknown = options.cookiePath;
  if (path != null && (typeof path !== "string" || !COOKIE_PATH.test(path))) {
    refuse(`cookiePath ${JSON.stringify(path)} is not a cookie path (a path starting with '/', of printable ASCII without ';')`);
  }
  const maxAge: unknown = options.cookieMaxAge;
  if (maxAge != null && !(Number.isInteger(maxAge) && (maxAge as number) > 0 && (maxAge as number) <= MAX_COOKIE_AGE)) {
    refuse(`cookieMaxAge must be a whole number of seconds from 1 to ${MAX_COOKIE_AGE} (400 days, the longest browsers keep a cookie)`);
  }
  const sameSite: unknown = options.sameSite;
  if (sameSite != null && (typeof sameSite !== "string" || !SAME_SITE.includes(sameSite.toLowerCase()))) {
    refuse(`sameSite ${JSON.stringify(sameSite)} is not Lax, Strict or None`);
  }
  if (typeof sameSite === "string" && sameSite.toLowerCase() === "none" && options.secure === false) {
    refuse("sameSite None needs secure: browsers drop a SameSite=None cookie that is not Secure");
  }
  // The carry cookie is host-only whatever cookieDomain is.
  for (const [option, name, domain] of [
    ["cookieName", visitorName, options.cookieDomain],
    ["carryCookieName", options.carryCookieName ?? DEFAULT_CARRY_NAME, undefined],
  ] as const) {
    const unfit = unfitPrefix(name, options.secure ?? true, options.cookiePath ?? "/", domain);
    if (unfit !== null) {
      refuse(`${option} ${JSON.stringify(name)} ${unfit}: browsers drop a cookie whose name's prefix its attributes do not fit`);
    }
  }
}

/**
 * What a cookie named `name` with these attributes lacks for its name's prefix (RFC 6265bis
 * 4.1.3, matched in any case: `__Secure-` needs `Secure`; `__Host-` needs `Secure`, `Path=/`
 * and no `Domain`), or null. The Python middlewares and identity.js check the same.
 */
function unfitPrefix(name: string, secure: boolean, path: string, domain: string | undefined): string | null {
  const prefix = name.slice(0, 9).toLowerCase();
  const host = prefix.startsWith("__host-");
  if (!host && prefix !== "__secure-") return null;
  if (!secure) return "needs secure";
  if (host && domain) return "cannot have a cookieDomain (a __Host- cookie is host-only)";
  if (host && path !== "/") return "needs cookiePath '/'";
  return null;
}

/**
 * Refuses, when the middleware is made, a `publicOrigin` that is no http(s) URL: the page
 * URL could not be made from it, and every handoff request went on to the handler as it
 * was, its token never exchanged and left in the address bar; and one that is more than
 * an origin: user information (`user:pw@`) went as given into the page URL sent with
 * every exchange; a path, a query or a fragment, which no page URL kept, was taken
 * silently. The value itself is not shown (it may hold credentials), as `baseUrl` is not.
 */
function checkPublicOrigin(publicOrigin: unknown): void {
  if (publicOrigin == null || publicOrigin === "") return;
  let url: URL | null;
  try {
    url = typeof publicOrigin === "string" ? new URL(publicOrigin) : null;
  } catch {
    url = null;
  }
  if (url === null || (url.protocol !== "http:" && url.protocol !== "https:") || !url.hostname) {
    throw new ConfigurationError(
      "handoffMiddleware: publicOrigin is not an http:// or https:// origin " +
        "(e.g. https://checkout.example-pay.com)",
    );
  }
  const text = publicOrigin as string;
  // "@" cannot stand in an origin: `https://@host` has user information, though empty.
  if (url.username || url.password || text.includes("@")) {
    throw new ConfigurationError(
      "handoffMiddleware: publicOrigin holds user info (user:password@): give the origin alone " +
        "(e.g. https://checkout.example-pay.com)",
    );
  }
  // `new URL` drops an empty query or fragment (`?`, `#`): the text is read for them.
  if (url.pathname !== "/" || text.includes("?") || text.includes("#")) {
    throw new ConfigurationError(
      "handoffMiddleware: publicOrigin has a path, a query or a fragment: give the origin alone " +
        "(e.g. https://checkout.example-pay.com)",
    );
  }
}

// RFC 6265 cookie-octet: printable ASCII except space, DQUOTE, comma, semicolon, backslash;
// and minus `%`, which readCookie decodes (as the Python SDK's cookies).
const COOKIE_OCTETS = /^[\x21\x23\x24\x26-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*$/;

/**
 * A `Set-Cookie` value. The carry cookie (`carry`) is HttpOnly, host-only (no `Domain`: the
 * userId and traits in it go to this host, not its subdomains) and `Lax` when the visitor
 * cookie is `Strict` (`carrySameSite`).
 */
function serializeCookie(
  name: string,
  value: string,
  options: HandoffMiddlewareOptions,
  maxAge: number = options.cookieMaxAge ?? ONE_YEAR,
  carry = false,
): string {
  const plain = COOKIE_OCTETS.test(value) ? value : encodeURIComponent(value);
  const parts = [`${name}=${plain}`];
  if (options.cookieDomain && !carry) parts.push(`Domain=${options.cookieDomain}`);
  parts.push(`Path=${options.cookiePath ?? "/"}`);
  parts.push(`Max-Age=${maxAge}`);
  parts.push(`Expires=${new Date(Date.now() + maxAge * 1000).toUTCString()}`);
  parts.push(`SameSite=${carry ? carrySameSite(options.sameSite) : (options.sameSite ?? "Lax")}`);
  if (options.secure ?? true) parts.push("Secure");
  if (carry) parts.push("HttpOnly");
  return parts.join("; ");
}

/**
 * The carry cookie's value for `identity`: without its traits when they make it over
 * MAX_CARRY_BYTES, null when even that is (a warning that names no id, either way).
 */
function carryValue(
  identity: Identity & { anonymousId: string },
  key: Uint8Array,
  carryName: string,
): string | null {
  const expires = Math.floor(Date.now() / 1000) + CARRY_MAX_AGE;
  const value = encodeCarry(identity, key, expires);
  if (value !== null) return value;
  const withoutTraits = encodeCarry({ ...identity, traits: {} }, key, expires);
  process.emitWarning(
    `restored identity too large for the ${carryName} cookie: ${
      withoutTraits === null ? "the next request's handler gets only the anonymousId" : "carried without its traits"
    }`,
    { code: "IDENTITY_CARRY_TOO_LARGE" },
  );
  return withoutTraits;
}

/**
 * The exchanges in flight, by token, of one middleware (in one process: workers apart do
 * not see each other's). The same handoff URL requested twice at once (a double click, a
 * prefetch and the navigation) made two exchanges: the second found the token used and,
 * for a visitor without the cookie, set it to a generated id, and whichever answer the
 * browser kept decided who the visitor was (the handoff lost). A landing whose token is
 * being exchanged now waits on that exchange: the token is exchanged once, as the Python
 * middlewares' `_Landings`.
 *
 * Only a handed-off identity is shared: a generated one (an unknown, used or expired token,
 * or a bad link, all exchanged as one unknown token) is no one's, so a landing that waited
 * on one makes its own exchange and gets an id of its own. An error of the exchange (the
 * service down) is every waiting landing's. Nothing is kept once the exchange has settled:
 * a later landing with the token exchanges it again (and finds it used), as before. No
 * landing's request can abort the exchange: a visitor who went away (the prefetch
 * cancelled) leaves it to the others.
 */
class Landings {
  readonly #flying = new Map<string, Promise<Identity>>();

  exchange(token: string, run: () => Promise<Identity>): Promise<Identity> {
    const flight = this.#flying.get(token);
    if (flight !== undefined) {
      return flight.then((identity) => (identity.source === "handoff" ? identity : run()));
    }
    const started = run();
    this.#flying.set(token, started);
    const landed = () => {
      if (this.#flying.get(token) === started) this.#flying.delete(token);
    };
    // Both ways: a `finally` would leave a rejection no one handles when no one waits.
    started.then(landed, landed);
    return started;
  }
}

function appendSetCookie(res: MiddlewareResponse, cookie: string): void {
  const existing = res.getHeader?.("set-cookie");
  const list = existing === undefined ? [] : Array.isArray(existing) ? existing : [String(existing)];
  res.setHeader("Set-Cookie", [...list, cookie]);
}

function requestOrigin(req: MiddlewareRequest, options: HandoffMiddlewareOptions): string {
  if (options.publicOrigin) return options.publicOrigin.replace(/\/+$/, "");
  const protocol = req.protocol ?? (req.socket?.encrypted ? "https" : "http");
  const host = header(req, "host") ?? "localhost";
  return `${protocol}://${host}`;
}

/**
 * Domain B's middleware, Express-compatible (`app.use(handoffMiddleware(client, {...}))`)
 * and usable with a plain `node:http` server (`middleware(req, res, next)`).
 *
 * On a GET whose URL carries the token it exchanges the token with `fallback: true` and
 * domain B's context ({page: {url, referrer}, ip, userAgent}), sets the visitor cookie and
 * answers 303 to the same URL without the token (other parameters kept), so the page loads
 * clean and analytics.js starts with the restored anonymousId. A used or expired token
 * gives a generated anonymousId (kept out of the cookie when the visitor already has one).
 * An empty, bare (`?handoff_token`) or over-long token (which the service would refuse) is
 * exchanged as an unknown one. When the service cannot be reached, it answers the same 303 without a cookie.
 * The same handoff URL requested twice at once is exchanged once (see `Landings`).
 * A handoff prepared with a `userId` alone has no anonymousId: the same 303 without a cookie
 * (neither the visitor cookie nor the carry cookie), and no error.
 *
 * With the visitor cookie it also sets the carry cookie (the exchanged identity, signed,
 * HttpOnly, host-only, 60 s; without the traits when they would make it over
 * MAX_CARRY_BYTES): on the next request, the 303's clean URL, `req.identity` is that
 * identity (`source` `handoff` or `generated`, `userId`, `traits`, `consent`) and the
 * carry cookie is cleared (appended to `Set-Cookie` before `next()`); until an answer
 * through the middleware clears it, it stays valid for its 60 s. Any other request
 * gets `req.identity` from the visitor cookie, if there is one, and goes on (`next()`).
 * The carry needs the client's key (an `IdentityClient`); a carry cookie that is forged,
 * expired, malformed, oversized or for another anonymousId is ignored, as is one without the
 * visitor cookie unless that is `Strict` (browsers withhold it after a cross-site landing's 303).
 */
export function handoffMiddleware(
  client: Pick<IdentityClient, "exchange"> & Partial<Pick<IdentityClient, "carryKey">>,
  options: HandoffMiddlewareOptions = {},
): (req: MiddlewareRequest, res: MiddlewareResponse, next: NextFunction) => void {
  checkOptions(options);
  checkPublicOrigin(options.publicOrigin);
  const tokenParam = options.tokenParam ?? "handoff_token";
  const cookieName = options.cookieName ?? DEFAULT_COOKIE_NAME;
  const carryName = options.carryCookieName ?? DEFAULT_CARRY_NAME;
  const key = client.carryKey?.();
  const strict = options.sameSite?.toLowerCase() === "strict";
  const landings = new Landings();

  /** req.identity from the visitor cookie, or from a valid carry cookie (then cleared). */
  const restore = (req: MiddlewareRequest, res: MiddlewareResponse, existing: string | undefined): void => {
    if (existing) req.identity = { anonymousId: existing, source: "cookie" };
    const carried = readRawCookie(req, carryName);
    if (carried === undefined) return;
    appendSetCookie(res, serializeCookie(carryName, "", options, 0, true));
    const identity = key ? decodeCarry(carried, key, Date.now() / 1000) : null;
    // Without the visitor cookie only when it is Strict: browsers withhold it from the request
    // after a cross-site landing's 303, the very request the carry cookie is for.
    const fits = existing ? identity?.anonymousId === existing : strict;
    if (identity && fits) req.identity = identity;
  };

  return function identityHandoff(req, res, next) {
    const existing = readCookie(req, cookieName);
    const rawUrl = req.originalUrl ?? req.url ?? "/";
    // A cheap test first; the query is parsed below (`handoff%5Ftoken` is the token too).
    if ((req.method ?? "GET").toUpperCase() !== "GET" || !rawUrl.includes("?")) {
      restore(req, res, existing);
      next();
      return;
    }
    if (existing) req.identity = { anonymousId: existing, source: "cookie" };
    // The token is taken out of the query as sent: the other parameters stay byte for byte.
    const queryAt = rawUrl.indexOf("?");
    // One leading slash: `//evil.example/` as a Location would leave the site.
    const path = (queryAt < 0 ? rawUrl : rawUrl.slice(0, queryAt)).replace(/^[/\\]+/, "/");
    if (!path.startsWith("/")) {
      restore(req, res, existing);
      next(); // an absolute-form request target: not a page of this site
      return;
    }
    const kept: string[] = [];
    let token: string | null = null;
    for (const part of queryAt < 0 ? [] : rawUrl.slice(queryAt + 1).split("&")) {
      const eq = part.indexOf("=");
      let name = eq < 0 ? part : part.slice(0, eq);
      try {
        name = decodeURIComponent(name.replace(/\+/g, " "));
      } catch {
        /* keep it as sent */
      }
      if (name !== tokenParam) {
        if (part !== "") kept.push(part);
      } else if (token === null) {
        // A bare `?handoff_token` is a present but empty token (a bad link), as in Python.
        token = eq < 0 ? "" : (new URLSearchParams(`t=${part.slice(eq + 1)}`).get("t") ?? "");
      }
    }
    if (token === null) {
      restore(req, res, existing);
      next();
      return;
    }
    // A token the service would refuse (400) is a bad link, not an error: the fallback.
    if (token.length === 0 || token.length > MAX_TOKEN_LENGTH) token = UNKNOWN_TOKEN;
    const location = kept.length > 0 ? `${path}?${kept.join("&")}` : path;
    let url: URL;
    try {
      url = new URL(location, requestOrigin(req, options));
    } catch {
      restore(req, res, existing);
      next();
      return;
    }

    const page: JsonObject = { url: url.href, path: url.pathname, search: url.search };
    const referrer = header(req, "referer");
    if (referrer) page.referrer = referrer;
    const context: JsonObject = { page };
    const ip = req.ip ?? req.socket?.remoteAddress;
    if (ip) context.ip = ip;
    const userAgent = header(req, "user-agent");
    if (userAgent) context.userAgent = userAgent;

    const redirect = () => {
      res.statusCode = 303;
      res.setHeader("Location", location);
      res.setHeader("Cache-Control", "no-store");
      res.setHeader("Content-Length", 0);
      res.end();
    };

    const usable = token;
    landings
      .exchange(usable, () =>
        client.exchange(usable, { fallback: true, event: options.event, properties: options.properties, context }),
      )
      .then(
        (identity) => {
          const { anonymousId } = identity;
          if (identity.source === "generated" && existing !== undefined) {
            req.identity = { anonymousId: existing, source: "cookie", exchanged: identity };
          } else if (anonymousId === null) {
            // A handoff prepared with a userId alone: no id for the visitor cookie, so none is
            // set (a cookie already there stays) and nothing is carried (the carry cookie is
            // read for the visitor cookie's anonymousId), as the Python SDK's `landed`.
            req.identity = {
              anonymousId: null,
              source: identity.source,
              userId: identity.userId,
              traits: identity.traits ?? {},
              consent: identity.consent ?? {},
              exchanged: identity,
            };
          } else {
            appendSetCookie(res, serializeCookie(cookieName, anonymousId, options));
            const carry = key ? carryValue({ ...identity, anonymousId }, key, carryName) : null;
            if (carry !== null) appendSetCookie(res, serializeCookie(carryName, carry, options, CARRY_MAX_AGE, true));
            req.identity = { anonymousId, source: identity.source, exchanged: identity };
          }
          redirect();
        },
        (error: unknown) => {
          try {
            options.onError?.(error, req);
          } catch {
            /* a logging hook must not break the page */
          }
          redirect();
        },
      )
      .catch(next);
  };
}
