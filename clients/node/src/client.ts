import { carryKey } from "./carry.js";
import {
  APIError,
  ConfigurationError,
  IdentityConnectionError,
  IdentityError,
  InvalidRequest,
  ServiceUnavailable,
  errorFromResponse,
} from "./errors.js";

export type JsonObject = { [key: string]: unknown };

export interface IdentityClientOptions {
  /** The service's base URL; default `process.env.IDENTITY_URL`. */
  baseUrl?: string;
  /** The source's write key; default `process.env.IDENTITY_WRITE_KEY`. */
  writeKey?: string;
  /** Time for one attempt, in whole milliseconds (default 5000; 1 to 2^31 - 1). */
  timeoutMs?: number;
  /** Retries of a prepare after a 503 or a connection error (default 2; 0 or more). Exchange is never retried (but on a kept-alive connection closed before any answer: see the class doc). */
  maxRetries?: number;
  /** First backoff delay in milliseconds (default 200; 0 to 2^31 - 1); doubled each retry, with full jitter. */
  backoffBaseMs?: number;
  /** Cap of one backoff delay, `Retry-After` included, in milliseconds (default 5000; 0 to 2^31 - 1). */
  maxBackoffMs?: number;
  /** The fetch to use (default the global one). */
  fetch?: typeof fetch;
  /**
   * Extra headers sent with every call (e.g. a tracing header); not `Authorization`,
   * `Content-Type` or `Accept` (the client's own). A name or value fetch would refuse (a CR,
   * LF or NUL) is a ConfigurationError from the constructor.
   */
  headers?: Record<string, string>;
}

export interface PrepareParams {
  /** The visitor's anonymousId on domain A (required unless `userId` is given). */
  anonymousId?: string | null;
  userId?: string | null;
  /** Absolute URL on domain B the visitor is sent to; its origin must be one of the source's. */
  destination: string;
  traits?: JsonObject | null;
  /** Domain A's Segment context (page, ip, userAgent...): the started event's. */
  context?: JsonObject | null;
  consent?: Record<string, boolean> | null;
  /** Seconds the handoff lives (default: the service's, 300). */
  ttl?: number | null;
}

export interface PreparedHandoff {
  token: string;
  /** `destination` with `handoff_token=<token>` added: redirect the visitor there. */
  redirectUrl: string;
  expiresAt: Date;
  /** Seconds. */
  expiresIn: number;
}

export interface ExchangeOptions {
  /** On an unknown, expired or used token, answer a generated anonymousId instead of TokenNotFound. */
  fallback?: boolean;
  /** Name of domain B's completion track (default the service's `Cross-Domain Handoff Completed`). */
  event?: string | null;
  properties?: JsonObject | null;
  /** Domain B's Segment context (page, ip, userAgent...). */
  context?: JsonObject | null;
}

export interface Identity {
  /**
   * Null only for a handoff prepared with a `userId` alone (then `userId` is set), as the
   * service answers it; a fallback's generated identity always has one.
   */
  anonymousId: string | null;
  userId: string | null;
  traits: JsonObject | null;
  context: JsonObject | null;
  consent: Record<string, boolean> | null;
  /** `handoff`: restored from the token; `generated`: a fallback made a new anonymousId. */
  source: "handoff" | "generated";
  preparedBy: string | null;
  preparedAt: Date | null;
  destination: string | null;
}

const DEFAULTS = {
  timeoutMs: 5000,
  maxRetries: 2,
  backoffBaseMs: 200,
  maxBackoffMs: 5000,
};

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function dropNullish(obj: Record<string, unknown>): JsonObject {
  const out: JsonObject = {};
  for (const [key, value] of Object.entries(obj)) if (value !== undefined && value !== null) out[key] = value;
  return out;
}

/** The longest delay setTimeout (and AbortSignal.timeout) waits: a longer one fires after 1 ms. */
const MAX_TIMER_MS = 2 ** 31 - 1;

const SETTINGS = {
  count: { valid: (n: number) => Number.isInteger(n) && n >= 0, what: "a whole number, 0 or more" },
  delay: { valid: (n: number) => n >= 0 && n <= MAX_TIMER_MS, what: `a number of milliseconds from 0 to ${MAX_TIMER_MS}` },
  // AbortSignal.timeout throws a RangeError for anything but a whole number, and 0 aborts at once.
  timeout: {
    valid: (n: number) => Number.isInteger(n) && n > 0 && n <= MAX_TIMER_MS,
    what: `a whole number of milliseconds from 1 to ${MAX_TIMER_MS}`,
  },
};

/**
 * A timing or retry setting as given, or a ConfigurationError when the client is made (as
 * the Python SDK's), not a surprise at a call: setTimeout waits a negative, NaN, infinite
 * or over-long delay as 1 ms, and AbortSignal.timeout throws for a timeout it cannot wait,
 * which failed every call as an IdentityConnectionError (an outage, to whoever reads it).
 */
function setting(name: string, value: unknown, kind: keyof typeof SETTINGS): number {
  const { valid, what } = SETTINGS[kind];
  if (typeof value !== "number" || !valid(value)) {
    throw new ConfigurationError(`IdentityClient: ${name} must be ${what}`);
  }
  return value;
}

/**
 * Refuses, when the client is made (as the Python SDK's), a service URL the calls cannot be
 * made under: not http(s) with a host; with user info (fetch refuses every such call, an
 * outage to whoever reads it, with the password in its message); with a query or a
 * fragment (each call's path is appended to the URL, so it would go into them). The URL
 * itself is not shown: it may hold credentials.
 */
function checkBaseUrl(baseUrl: string): void {
  let url: URL | null;
  try {
    url = new URL(baseUrl);
  } catch {
    url = null;
  }
  if (url === null || (url.protocol !== "http:" && url.protocol !== "https:") || !url.hostname) {
    throw new ConfigurationError("IdentityClient: baseUrl is not an http:// or https:// URL");
  }
  if (url.username || url.password) {
    throw new ConfigurationError("IdentityClient: baseUrl holds user info (user:password@): the write key is the credential");
  }
  // Neither can stand unescaped in a path: either is a query or a fragment, empty or not.
  if (baseUrl.includes("?") || baseUrl.includes("#")) {
    throw new ConfigurationError(
      "IdentityClient: baseUrl has a query or a fragment: give the base URL alone " +
        "(e.g. https://identity.internal or https://example.com/identity)",
    );
  }
}

/** The headers the client sends itself: an extra one of the same name would be added to them. */
const OWN_HEADERS = new Set(["authorization", "content-type", "accept"]);
/** The headers Node's fetch (undici) refuses at every call, whatever their value. */
const FETCH_REFUSED = new Set(["connection", "keep-alive", "transfer-encoding", "upgrade", "expect", "content-length"]);

/**
 * `headers` (the extra headers of every call), or a ConfigurationError when the client is
 * made: a name or value fetch refuses (a CR, LF or NUL; no token; Connection, Expect,
 * Content-Length...) failed every call as an IdentityConnectionError, and one of the
 * client's own headers was added to it ("Bearer x,
 * Basic ..." is no credential the service reads). Values are not shown: they may be secrets.
 */
function extraHeaders(headers: Record<string, string> | undefined): Record<string, string> {
  const checked = new Headers();
  for (const [name, value] of Object.entries(headers ?? {})) {
    try {
      checked.append(name, value); // fetch's own rules of names and values
    } catch {
      throw new ConfigurationError(
        `IdentityClient: headers: ${JSON.stringify(name)} is not a header name, or its value holds a CR, LF or NUL`,
      );
    }
    if (OWN_HEADERS.has(name.toLowerCase())) {
      throw new ConfigurationError(`IdentityClient: headers: ${name} is the client's own (the write key, JSON)`);
    }
    if (FETCH_REFUSED.has(name.toLowerCase())) {
      throw new ConfigurationError(`IdentityClient: headers: ${name} is one fetch refuses to send (the connection's own)`);
    }
  }
  return { ...headers };
}

/** A number JSON cannot hold: refused, where JSON.stringify would send null. */
function finiteOnly(_key: string, value: unknown): unknown {
  if (typeof value === "number" && !Number.isFinite(value)) {
    throw new InvalidRequest("the request cannot be sent as JSON: a number that is not finite (NaN or Infinity)", {
      title: "Invalid request",
    });
  }
  return value;
}

/**
 * `body` as the JSON sent, encoded once per call (a prepare's retries send the same text).
 * What JSON cannot hold is an `InvalidRequest` and nothing is sent, as in the Python SDK:
 * NaN and Infinity (JSON.stringify would send null), a BigInt or a cycle (its raw
 * TypeError, whose text names the type, never a value).
 */
function encoded(body: JsonObject): string {
  try {
    return JSON.stringify(body, finiteOnly);
  } catch (error) {
    if (error instanceof InvalidRequest) throw error;
    const reason = error instanceof Error ? error.message.split("\n")[0] : String(error);
    throw new InvalidRequest(`the request cannot be sent as JSON: ${reason}`, { title: "Invalid request" });
  }
}

/**
 * The identity-service client. One instance per process is enough: it holds no connection
 * of its own (Node's fetch pools connections).
 *
 * Retries: `prepare` is retried (at most `maxRetries` times, exponential backoff with full
 * jitter, `Retry-After` honoured up to `maxBackoffMs`) after a 503 or a connection error or
 * timeout; a repeated prepare at worst leaves an unused token that expires. `exchange` is
 * NEVER retried: a token works once, so when an exchange's answer is lost the service may
 * already have consumed the token, and a retry would answer 404 and lose the identity
 * anyway. The caller exchanges with `fallback: true` (the middleware does) so that the page
 * goes on with a generated anonymousId instead.
 *
 * One failure alone is sent again, once, at once, for both: the server closed (or reset)
 * the kept-alive connection the call went on before any of the answer came, which a server
 * does only when it has read nothing of the request (see `closedUnanswered`).
 */
export class IdentityClient {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  readonly maxRetries: number;
  readonly backoffBaseMs: number;
  readonly maxBackoffMs: number;
  readonly #authorization: string;
  readonly #writeKey: string;
  readonly #fetch: typeof fetch;
  readonly #headers: Record<string, string>;

  constructor(options: IdentityClientOptions = {}) {
    const baseUrl = options.baseUrl ?? process.env.IDENTITY_URL;
    const writeKey = options.writeKey ?? process.env.IDENTITY_WRITE_KEY;
    if (!baseUrl) throw new ConfigurationError("IdentityClient: baseUrl (or IDENTITY_URL) is required");
    if (!writeKey) throw new ConfigurationError("IdentityClient: writeKey (or IDENTITY_WRITE_KEY) is required");
    // The service's rule (its sources.can_be_sent): HTTP Basic ends the user name at a ':',
    // and only printable ASCII keys are read. The key itself is not shown.
    if (!/^[\x20-\x39\x3b-\x7e]+$/.test(writeKey)) {
      throw new ConfigurationError("IdentityClient: writeKey is not one the service can read: printable ASCII without ':'");
    }
    checkBaseUrl(baseUrl);
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.timeoutMs = setting("timeoutMs", options.timeoutMs ?? DEFAULTS.timeoutMs, "timeout");
    this.maxRetries = setting("maxRetries", options.maxRetries ?? DEFAULTS.maxRetries, "count");
    this.backoffBaseMs = setting("backoffBaseMs", options.backoffBaseMs ?? DEFAULTS.backoffBaseMs, "delay");
    this.maxBackoffMs = setting("maxBackoffMs", options.maxBackoffMs ?? DEFAULTS.maxBackoffMs, "delay");
    this.#writeKey = writeKey;
    this.#authorization = "Basic " + Buffer.from(`${writeKey}:`, "utf8").toString("base64");
    this.#fetch = options.fetch ?? globalThis.fetch;
    this.#headers = extraHeaders(options.headers);
  }

  /** Keeps the write key out of anything printed. */
  toJSON(): JsonObject {
    return { baseUrl: this.baseUrl, timeoutMs: this.timeoutMs, maxRetries: this.maxRetries };
  }

  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return `IdentityClient { baseUrl: '${this.baseUrl}' }`;
  }

  /**
   * The signing key of `handoffMiddleware`'s carry cookie: HMAC-SHA256 of a fixed label
   * under the write key (the write key itself never leaves the client).
   */
  carryKey(): Buffer {
    return carryKey(this.#writeKey);
  }

  /** Domain A: keeps the visitor's identity under a one-time token for `destination`. */
  async prepare(params: PrepareParams): Promise<PreparedHandoff> {
    const body = dropNullish({
      anonymousId: params.anonymousId,
      userId: params.userId,
      destination: params.destination,
      traits: params.traits,
      context: params.context,
      consent: params.consent,
      ttl: params.ttl,
    });
    const text = encoded(body);
    const ids = [params.anonymousId, params.userId].filter((id): id is string => typeof id === "string");
    let attempt = 0;
    for (;;) {
      try {
        // The visitor's ids are scrubbed from its errors as the token is from an exchange's.
        const answer = await this.#post("/v1/handoffs", text, ids);
        return {
          token: answer.string("token"),
          redirectUrl: answer.url("redirectUrl"),
          expiresAt: answer.date("expiresAt"),
          expiresIn: answer.number("expiresIn"),
        };
      } catch (error) {
        const retryable = error instanceof ServiceUnavailable || error instanceof IdentityConnectionError;
        if (!retryable || attempt >= this.maxRetries) throw error;
        await sleep(this.#backoff(attempt, error instanceof ServiceUnavailable ? error.retryAfter : null));
        attempt += 1;
      }
    }
  }

  /**
   * Domain B: exchanges a token for the identity, once. Never retried but on a kept-alive
   * connection closed before any answer (see the class doc):
   * pass `fallback: true` to get a generated anonymousId when the token cannot be exchanged.
   */
  async exchange(token: string, options: ExchangeOptions = {}): Promise<Identity> {
    const body = dropNullish({
      token,
      fallback: options.fallback ? true : undefined,
      event: options.event,
      properties: options.properties,
      context: options.context,
    });
    const answer = await this.#post("/v1/handoffs/exchange", encoded(body), [token]);
    const anonymousId = answer.optionalString("anonymousId");
    const userId = answer.optionalString("userId");
    // A handoff prepared with a userId alone has no anonymousId; none of either is not an
    // identity (as the Python SDK's `_identity`).
    if (anonymousId === "" || (anonymousId === null && !userId)) {
      throw answer.malformed("anonymousId", "a non-empty string, or null with a userId");
    }
    return {
      anonymousId,
      userId,
      traits: answer.optionalObject("traits"),
      context: answer.optionalObject("context"),
      consent: answer.optionalObject("consent") as Record<string, boolean> | null,
      source: answer.data.source === "generated" ? "generated" : "handoff",
      preparedBy: answer.optionalString("preparedBy"),
      preparedAt: answer.data.preparedAt == null ? null : answer.date("preparedAt"),
      destination: answer.optionalString("destination"),
    };
  }

  /** Delay before retry number `attempt + 1`, in milliseconds. */
  #backoff(attempt: number, retryAfterSeconds: number | null): number {
    // From attempt 1024 on, 2 ** attempt is Infinity (capped below), and 0 * Infinity NaN,
    // which Math.max would take over a Retry-After and setTimeout wait as 1 ms: no base is
    // no backoff, at any attempt.
    const exponential = this.backoffBaseMs === 0 ? 0 : Math.min(this.maxBackoffMs, this.backoffBaseMs * 2 ** attempt);
    const jittered = Math.random() * exponential; // full jitter
    if (retryAfterSeconds !== null) return Math.min(this.maxBackoffMs, Math.max(retryAfterSeconds * 1000, jittered));
    return jittered;
  }

  /**
   * `text` without the write key (raw, as its Basic credentials, percent-encoded; a Bearer
   * form holds it raw) nor any of `secrets` (the token being exchanged, the visitor's ids
   * being prepared: raw, percent-encoded, and as a JSON body holds them, its non-ASCII
   * characters raw or escaped). A form shorter than SHORT_SECRET only where it stands
   * alone, as the Python SDK's `_scrub`.
   */
  #scrub(text: string, secrets: readonly string[] = []): string {
    const key = this.#writeKey;
    const forms = [Buffer.from(`${key}:`, "utf8").toString("base64"), key, encodeURIComponent(key)];
    for (const secret of secrets) {
      const json = JSON.stringify(secret).slice(1, -1);
      const ascii = json.replace(/[\u0080-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
      forms.push(secret, percentEncoded(secret), json, ascii);
    }
    let out = text;
    for (const form of new Set(forms.sort((a, b) => b.length - a.length))) {
      if (!form) continue;
      if (form.length >= SHORT_SECRET) {
        out = out.split(form).join("***");
      } else {
        const escaped = form.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
        out = out.replace(new RegExp(`(?<![${WORD_CHARS}])${escaped}(?![${WORD_CHARS}])`, "g"), "***");
      }
    }
    return out;
  }

  /**
   * The POST of `body` to `url`, up to the answer's head (each attempt within `timeoutMs`):
   * sent again once, at once, when `retry` and the connection failed before any of the
   * answer came in a way only a closed kept-alive connection fails (`closedUnanswered`).
   */
  async #send(url: string, body: string, retry: boolean): Promise<Response> {
    try {
      return await this.#fetch(url, {
        method: "POST",
        headers: {
          ...this.#headers,
          authorization: this.#authorization,
          "content-type": "application/json",
          accept: "application/json, application/problem+json",
        },
        body,
        redirect: "manual",
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (error) {
      if (retry && closedUnanswered(error)) return this.#send(url, body, false);
      throw error;
    }
  }

  /** One call, sending `body` (the encoded JSON). */
  async #post(path: string, body: string, secrets: readonly string[] = []): Promise<Answer> {
    const scrub = (text: string) => this.#scrub(text, secrets);
    const url = this.baseUrl + path;
    let response: Response;
    let text: string;
    try {
      response = await this.#send(url, body, true);
      text = await response.text();
    } catch (error) {
      if (error instanceof IdentityError) throw error;
      const err = error as { name?: string; message?: string; cause?: { code?: string; message?: string } };
      const timedOut = err?.name === "TimeoutError" || err?.name === "AbortError";
      const reason = timedOut
        ? `timed out after ${this.timeoutMs} ms`
        : (err?.cause?.code ?? err?.cause?.message ?? err?.message ?? "connection failed");
      throw new IdentityConnectionError(scrub(`POST ${url}: ${reason}`), {
        title: timedOut ? "Timeout" : "Connection error",
        detail: scrub(String(reason)),
        cause: safeCause(error, scrub),
      });
    }
    if (response.status >= 300) {
      // Defensive: the service never echoes the key or the token, but an upstream might;
      // no field of the error (message, title, detail, problem...) carries them.
      throw errorFromResponse(response.status, text, response.headers, scrub);
    }
    let data: unknown;
    try {
      data = JSON.parse(text);
    } catch {
      // Without JSON.parse's error as the cause: its message quotes a piece of the answer,
      // which may be a piece of a secret that no scrubbing would recognize.
      throw new APIError(`POST ${url}: the answer (HTTP ${response.status}) is not JSON`, {
        status: response.status,
        title: "Malformed answer",
        detail: "the answer is not JSON",
      });
    }
    if (data === null || typeof data !== "object" || Array.isArray(data)) {
      throw new APIError(`POST ${url}: the answer (HTTP ${response.status}) is not a JSON object`, {
        status: response.status,
        title: "Malformed answer",
        detail: "the answer is not a JSON object",
      });
    }
    return new Answer(data as JsonObject, `POST ${url}`, response.status);
  }
}

/**
 * Whether a rejected fetch (no answer's head came) failed because the server closed or
 * reset the kept-alive connection it went on before any of the answer: the one failure
 * `#send` retries, once, at once, prepare and exchange alike (as the Python SDK's
 * `_closed_unanswered`).
 *
 * A server may close a connection kept alive between requests at any time (RFC 9112 9.5);
 * the service's front does so at its connection limit, for a new connection, and nginx at
 * its keepalive_timeout. Node's fetch (undici) drops a pooled socket it has seen end, but a
 * FIN that comes while the request is written fails it: `SocketError: other side closed`
 * (UND_ERR_SOCKET), or `ECONNRESET` when the request's bytes came in as the server closed.
 * undici retries no POST itself (only requests it had not written, and idempotent ones
 * through its RetryAgent, which fetch does not use). So, as browsers do for a request that
 * failed on a reused connection before any byte of its answer, it is sent again:
 *
 * - a server closes a kept-alive connection only when it has read nothing of a next
 *   request (the front, nginx), so the request was not processed, and a retry does it once;
 * - were it processed anyway (a server that crashed after applying it), a retried exchange
 *   answers `token-not-found`, the same fallback or error as giving up, and a retried
 *   prepare at worst leaves one more unused token, which expires (300 s at most): the retry
 *   can never make things worse.
 *
 * fetch does not say whether the socket was reused. undici's SocketError gives the bytes
 * the socket read: none means a connection opened for this very request (a reused one read
 * the answers before), refused by the server itself, not retried here (prepare's
 * `maxRetries` covers a prepare); some means a reused socket, or a head cut short, which
 * fetch cannot tell from none (the retry is harmless either way, above). A reset tells
 * nothing of the socket: retried, as a disconnect before any of the answer. Never retried:
 * a timeout, an answer whose head came (a body cut short fails `response.text()`, not
 * fetch), any HTTP status, an answer undici's parser refused.
 */
function closedUnanswered(error: unknown): boolean {
  const cause = (error as { cause?: unknown } | null)?.cause;
  if (cause === null || typeof cause !== "object") return false;
  const { code, socket } = cause as { code?: unknown; socket?: { bytesRead?: unknown } };
  if (code === "UND_ERR_SOCKET") {
    const read = socket?.bytesRead;
    return typeof read !== "number" || read > 0;
  }
  return code === "ECONNRESET" || code === "EPIPE";
}

/**
 * A failed fetch's error chain, as the cause of an IdentityConnectionError: each error's
 * name, `code` and message (scrubbed), nothing else. undici's `HTTPParserError` keeps in
 * `data` the answer's bytes from where parsing failed, which `util.inspect` prints: an
 * answer that is not HTTP and echoes the request holds the token and the write key there.
 */
function safeCause(error: unknown, scrub: (text: string) => string, depth = 0): Error | undefined {
  if (error === null || typeof error !== "object" || depth > 8) return undefined;
  const source = error as { name?: unknown; message?: unknown; code?: unknown; cause?: unknown };
  const inner = safeCause(source.cause, scrub, depth + 1);
  const copy: Error & { code?: string } = new Error(
    scrub(typeof source.message === "string" ? source.message : ""),
    inner === undefined ? undefined : { cause: inner },
  );
  copy.name = typeof source.name === "string" ? source.name : "Error";
  if (typeof source.code === "string") copy.code = source.code;
  return copy;
}

/** `text` percent-encoded; "" for one that cannot be (a lone surrogate: a URIError). */
function percentEncoded(text: string): string {
  try {
    return encodeURIComponent(text);
  } catch {
    return "";
  }
}

/**
 * A secret shorter than this is scrubbed only where it stands alone (not inside a word of
 * WORD_CHARS), so that a short write key ("k") or token (the middleware's "-") does not
 * mangle every "k" or hyphen of an error's text; as the Python SDK's `_SHORT_SECRET`.
 */
const SHORT_SECRET = 8;
const WORD_CHARS = "A-Za-z0-9_\\-";

/**
 * Reads the fields of a 2xx answer, each of the type the API documents, or throws an
 * `APIError` that names the field (never its value): a malformed answer is not a value.
 */
class Answer {
  constructor(
    readonly data: JsonObject,
    private readonly what: string,
    private readonly status: number,
  ) {}

  /** The malformed answer's APIError for `field`, which is not `expected`. */
  malformed(field: string, expected: string): APIError {
    const detail = `the answer's ${field} is not ${expected}`;
    return new APIError(`${this.what}: ${detail}`, { status: this.status, title: "Malformed answer", detail });
  }

  /** A non-empty string. */
  string(field: string): string {
    const value = this.data[field];
    if (typeof value !== "string" || value === "") throw this.malformed(field, "a non-empty string");
    return value;
  }

  /** A string, or null when absent or null. */
  optionalString(field: string): string | null {
    const value = this.data[field];
    if (value === undefined || value === null) return null;
    if (typeof value !== "string") throw this.malformed(field, "a string or null");
    return value;
  }

  /** A JSON object, or null when absent or null. */
  optionalObject(field: string): JsonObject | null {
    const value = this.data[field];
    if (value === undefined || value === null) return null;
    if (typeof value !== "object" || Array.isArray(value)) throw this.malformed(field, "an object or null");
    return value as JsonObject;
  }

  /** An absolute http(s) URL, as a string. */
  url(field: string): string {
    const value = this.string(field);
    let url: URL | null = null;
    try {
      url = new URL(value);
    } catch {
      url = null;
    }
    if (url === null || (url.protocol !== "https:" && url.protocol !== "http:")) {
      throw this.malformed(field, "an absolute http(s) URL");
    }
    return value;
  }

  /** A date-time string, as a Date. */
  date(field: string): Date {
    const value = this.data[field];
    const date = typeof value === "string" ? new Date(value) : null;
    if (date === null || Number.isNaN(date.getTime())) throw this.malformed(field, "a date-time");
    return date;
  }

  /** A finite number. */
  number(field: string): number {
    const value = this.data[field];
    if (typeof value !== "number" || !Number.isFinite(value)) throw this.malformed(field, "a number");
    return value;
  }
}
