import type { ExchangeOptions, Identity, IdentityClient, JsonObject } from "./client.js";

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

/** `req.identity`: from the exchange on the landing request, from the cookie afterwards. */
export interface RequestIdentity {
  anonymousId: string;
  /** `handoff` / `generated`: from an exchange; `cookie`: read from the visitor cookie. */
  source: "handoff" | "generated" | "cookie";
  /** The whole exchange answer, on the landing request only. */
  exchanged?: Identity;
}

export interface HandoffMiddlewareOptions {
  /** Query parameter carrying the token (default `handoff_token`, the service's). */
  tokenParam?: string;
  /** The visitor cookie (default `ajs_anonymous_id`, the one analytics.js reads). */
  cookieName?: string;
  /** Cookie `Domain` (e.g. `.example-pay.com`); default none (host-only). */
  cookieDomain?: string;
  /** Cookie `Max-Age` in seconds (default one year). */
  cookieMaxAge?: number;
  /** Cookie `SameSite` (default `Lax`). */
  sameSite?: "Lax" | "Strict" | "None";
  /** Cookie `Secure` (default true; false for plain-http development). */
  secure?: boolean;
  /** Cookie `Path` (default `/`). */
  cookiePath?: string;
  /** Domain B's completion event name and properties, passed to the exchange. */
  event?: ExchangeOptions["event"];
  properties?: ExchangeOptions["properties"];
  /**
   * The public origin of this site (`https://checkout.example-pay.com`), used for the page
   * URL in the exchange's context. Default: from the request (Express's `req.protocol`, or
   * the socket, and the `Host` header).
   */
  publicOrigin?: string;
  /** Called with any error of an exchange (the visitor is redirected all the same). */
  onError?: (error: unknown, req: MiddlewareRequest) => void;
}

const ONE_YEAR = 365 * 24 * 60 * 60;

function header(req: MiddlewareRequest, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/** Reads one cookie from the request's Cookie header. */
export function readCookie(req: MiddlewareRequest, name: string): string | undefined {
  const raw = header(req, "cookie");
  if (!raw) return undefined;
  for (const part of raw.split(";")) {
    const eq = part.indexOf("=");
    if (eq < 0 || part.slice(0, eq).trim() !== name) continue;
    let value = part.slice(eq + 1).trim();
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
  return undefined;
}

// RFC 6265 cookie-octet: printable ASCII except space, DQUOTE, comma, semicolon, backslash.
const COOKIE_OCTETS = /^[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*$/;

function serializeCookie(name: string, value: string, options: HandoffMiddlewareOptions): string {
  const plain = COOKIE_OCTETS.test(value) ? value : encodeURIComponent(value);
  const parts = [`${name}=${plain}`];
  if (options.cookieDomain) parts.push(`Domain=${options.cookieDomain}`);
  parts.push(`Path=${options.cookiePath ?? "/"}`);
  const maxAge = options.cookieMaxAge ?? ONE_YEAR;
  parts.push(`Max-Age=${Math.floor(maxAge)}`);
  parts.push(`Expires=${new Date(Date.now() + maxAge * 1000).toUTCString()}`);
  parts.push(`SameSite=${options.sameSite ?? "Lax"}`);
  if (options.secure ?? true) parts.push("Secure");
  return parts.join("; ");
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
 * When the service cannot be reached, it answers the same 303 without a cookie. Any other
 * request gets `req.identity` from the cookie, if there is one, and goes on (`next()`).
 */
export function handoffMiddleware(
  client: Pick<IdentityClient, "exchange">,
  options: HandoffMiddlewareOptions = {},
): (req: MiddlewareRequest, res: MiddlewareResponse, next: NextFunction) => void {
  const tokenParam = options.tokenParam ?? "handoff_token";
  const cookieName = options.cookieName ?? "ajs_anonymous_id";

  return function identityHandoff(req, res, next) {
    const existing = readCookie(req, cookieName);
    if (existing) req.identity = { anonymousId: existing, source: "cookie" };

    const rawUrl = req.originalUrl ?? req.url ?? "/";
    if ((req.method ?? "GET").toUpperCase() !== "GET" || !rawUrl.includes(`${tokenParam}=`)) {
      next();
      return;
    }
    // The token is taken out of the query as sent: the other parameters stay byte for byte.
    const queryAt = rawUrl.indexOf("?");
    // One leading slash: `//evil.example/` as a Location would leave the site.
    const path = (queryAt < 0 ? rawUrl : rawUrl.slice(0, queryAt)).replace(/^[/\\]+/, "/");
    if (!path.startsWith("/")) {
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
        token = new URLSearchParams(part).get(tokenParam);
      }
    }
    if (!token) {
      next();
      return;
    }
    const location = kept.length > 0 ? `${path}?${kept.join("&")}` : path;
    let url: URL;
    try {
      url = new URL(location, requestOrigin(req, options));
    } catch {
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
      res.setHeader("Referrer-Policy", "no-referrer");
      res.setHeader("Content-Length", 0);
      res.end();
    };

    client
      .exchange(token, { fallback: true, event: options.event, properties: options.properties, context })
      .then(
        (identity) => {
          const keepExisting = identity.source === "generated" && existing !== undefined;
          if (!keepExisting) appendSetCookie(res, serializeCookie(cookieName, identity.anonymousId, options));
          req.identity = keepExisting
            ? { anonymousId: existing, source: "cookie", exchanged: identity }
            : { anonymousId: identity.anonymousId, source: identity.source, exchanged: identity };
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
