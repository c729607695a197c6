/**
 * Errors mapped from the service's RFC 9457 problem documents, one class per problem type
 * (`urn:identity-service:problem:<slug>`), with the same names as the Python SDK's.
 * Messages are built from the problem's title and detail only: never from the write key.
 */

export const PROBLEM_PREFIX = "urn:identity-service:problem:";

/** One field error of a `validation-failed` problem. */
export interface FieldError {
  field: string;
  message: string;
}

/** The parsed problem document (or what could be read of a non-problem error answer). */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail?: string;
  instance?: string;
  errors?: FieldError[];
  [key: string]: unknown;
}

export interface IdentityErrorInit {
  status?: number | null;
  type?: string;
  title?: string;
  detail?: string;
  instance?: string;
  requestId?: string;
  retryAfter?: number | null;
  problem?: Problem;
  cause?: unknown;
}

/** Base of every error the client throws. */
export class IdentityError extends Error {
  /** HTTP status, or null when no answer came (connection errors, timeouts). */
  readonly status: number | null;
  /** The problem type URI (`urn:identity-service:problem:<slug>`), or `about:blank`. */
  readonly type: string;
  readonly title: string;
  readonly detail: string | undefined;
  readonly instance: string | undefined;
  /** The answer's `X-Request-ID`, to find the request in the service's log. */
  readonly requestId: string | undefined;
  /** The whole problem document as answered. */
  readonly problem: Problem | undefined;

  constructor(message: string, init: IdentityErrorInit = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.status = init.status ?? null;
    this.type = init.type ?? "about:blank";
    this.title = init.title ?? message;
    this.detail = init.detail;
    this.instance = init.instance;
    this.requestId = init.requestId;
    this.problem = init.problem;
  }

  /** The slug after `urn:identity-service:problem:`, or undefined for another type. */
  get slug(): string | undefined {
    return this.type.startsWith(PROBLEM_PREFIX) ? this.type.slice(PROBLEM_PREFIX.length) : undefined;
  }
}

/**
 * An error answer of the service. Base of every problem class below (as in the Python
 * SDK); itself for another problem type or an answer that is not a problem document.
 */
export class APIError extends IdentityError {}

/** 400 `validation-failed` or `malformed-json`: `errors` lists the field errors. */
export class InvalidRequest extends APIError {
  readonly errors: FieldError[];
  constructor(message: string, init: IdentityErrorInit = {}) {
    super(message, init);
    this.errors = Array.isArray(init.problem?.errors) ? init.problem.errors : [];
  }
}

/** 401 `unauthorized`: no, malformed or unknown write key. */
export class Unauthorized extends APIError {}

/** 403 `destination-not-allowed`: prepare to an origin the source may not hand off to. */
export class DestinationNotAllowed extends APIError {}

/** 403 `audience-mismatch`: exchange by a source the handoff's origin is not one of. The token is used up. */
export class AudienceMismatch extends APIError {}

/** 404 `token-not-found`: unknown, expired or already used token (one answer for all three). */
export class TokenNotFound extends APIError {}

/** 413 `payload-too-large`: the body is over the service's `IDENTITY_MAX_BODY_BYTES`. */
export class PayloadTooLarge extends APIError {}

/** 413 `event-too-large`: an event would be over 32 KB as sent; the detail names it. A `PayloadTooLarge`, as in Python. */
export class EventTooLarge extends PayloadTooLarge {}

/** 415 `unsupported-media-type`. */
export class UnsupportedMediaType extends APIError {}

/** 429 `rate-limited`: `retryAfter` in seconds when the answer said. */
export class RateLimited extends APIError {
  readonly retryAfter: number | null;
  constructor(message: string, init: IdentityErrorInit = {}) {
    super(message, init);
    this.retryAfter = init.retryAfter ?? null;
  }
}

/** 503 `service-unavailable`: the store is down or slow; `retryAfter` in seconds. */
export class ServiceUnavailable extends APIError {
  readonly retryAfter: number | null;
  constructor(message: string, init: IdentityErrorInit = {}) {
    super(message, init);
    this.retryAfter = init.retryAfter ?? null;
  }
}

/**
 * The client lacks its base URL or write key, or a setting is out of range (thrown by the
 * constructor; no request made); or a cookie option of `handoffMiddleware` a Set-Cookie
 * cannot hold as given (a `cookieDomain` that is not a domain name, a `cookieName` that is
 * not a token, a `cookiePath` with a `;`, a `cookieMaxAge` that is not 1 to 400 days...).
 */
export class ConfigurationError extends IdentityError {}

/** No answer: the connection failed or the request timed out. `status` is null. */
export class IdentityConnectionError extends IdentityError {}

type ErrorClass = new (message: string, init?: IdentityErrorInit) => IdentityError;

const BY_SLUG: Record<string, ErrorClass> = {
  "validation-failed": InvalidRequest,
  "malformed-json": InvalidRequest,
  unauthorized: Unauthorized,
  "destination-not-allowed": DestinationNotAllowed,
  "audience-mismatch": AudienceMismatch,
  "token-not-found": TokenNotFound,
  "payload-too-large": PayloadTooLarge,
  "event-too-large": EventTooLarge,
  "unsupported-media-type": UnsupportedMediaType,
  "rate-limited": RateLimited,
  "service-unavailable": ServiceUnavailable,
};

// RFC 9110 10.2.3: Retry-After is delay-seconds (1*DIGIT) or an HTTP-date (5.6.7), which a
// recipient reads in all three of its forms: IMF-fixdate, and the obsolete RFC 850 and
// asctime forms; all in UTC. The Python SDK reads these forms too, with email.utils (which
// also takes a few others, such as a numeric zone).
// Date.parse is not used: it reads "1.5" or "-3" as dates of 2001, and asctime's in local time.
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)";
const LONG_DAY = "(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day";
const MONTH = `(?<month>${MONTHS.join("|")})`;
const TIME = "(?<hour>[0-9]{2}):(?<minute>[0-9]{2}):(?<second>[0-9]{2})";
const HTTP_DATES = [
  new RegExp(`^${DAY}, (?<day>[0-9]{2}) ${MONTH} (?<year>[0-9]{4}) ${TIME} GMT$`),
  new RegExp(`^${LONG_DAY}, (?<day>[0-9]{2})-${MONTH}-(?<yy>[0-9]{2}) ${TIME} GMT$`),
  new RegExp(`^${DAY} ${MONTH} (?<day>[ 0-9][0-9]) ${TIME} (?<year>[0-9]{4})$`),
];

/** An HTTP-date as milliseconds since the epoch, or null when `value` is none (or no real date). */
function httpDate(value: string, now: number): number | null {
  for (const form of HTTP_DATES) {
    const parts = form.exec(value)?.groups;
    if (parts === undefined) continue;
    let year: number;
    if (parts.yy !== undefined) {
      // RFC 850's two digits: this century's year, unless more than 50 years ahead.
      const thisYear = new Date(now).getUTCFullYear();
      year = thisYear - (thisYear % 100) + Number(parts.yy);
      if (year > thisYear + 50) year -= 100;
    } else {
      year = Number(parts.year);
    }
    const [month, day, hour, minute, second] = [
      MONTHS.indexOf(parts.month),
      Number(parts.day),
      Number(parts.hour),
      Number(parts.minute),
      Number(parts.second),
    ];
    const date = new Date(0);
    date.setUTCFullYear(year, month, day); // not Date.UTC, which reads years 0 to 99 as 19xx
    date.setUTCHours(hour, minute, second);
    // A Date rolls 31 Feb over to March and 25:00 to the next day: no such date (nor year 0).
    const real =
      year >= 1 &&
      date.getUTCMonth() === month &&
      date.getUTCDate() === day &&
      date.getUTCHours() === hour &&
      date.getUTCMinutes() === minute &&
      date.getUTCSeconds() === second;
    return real ? date.getTime() : null;
  }
  return null;
}

/**
 * The seconds a `Retry-After` header asks to wait (until its date: whole seconds, 0 once
 * past), or null: absent, neither delay-seconds nor an HTTP-date (`1.5`, `-3`, an ISO
 * date), or too large to be a finite number.
 */
export function parseRetryAfter(value: string | null | undefined, now: number = Date.now()): number | null {
  if (value == null) return null;
  const trimmed = value.replace(/^[ \t]+|[ \t]+$/g, "");
  if (/^[0-9]+$/.test(trimmed)) {
    const seconds = Number(trimmed);
    return Number.isFinite(seconds) ? seconds : null;
  }
  const date = httpDate(trimmed, now);
  return date === null ? null : Math.max(0, Math.ceil((date - now) / 1000));
}

/**
 * The class of an answer whose problem type is not one of the service's (another type, or
 * no problem document): by status, as the Python SDK's `STATUS_CLASSES` (e.g. a proxy's 503
 * or 429, a gateway's 401).
 */
const BY_STATUS: Record<number, ErrorClass> = {
  401: Unauthorized,
  413: PayloadTooLarge,
  415: UnsupportedMediaType,
  429: RateLimited,
  503: ServiceUnavailable,
};

/** Every string in `value` (keys included) passed through `scrub`; other values kept. */
function scrubDeep(value: unknown, scrub: (text: string) => string): unknown {
  if (typeof value === "string") return scrub(value);
  if (Array.isArray(value)) return value.map((item) => scrubDeep(item, scrub));
  if (value !== null && typeof value === "object") {
    const out: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value)) out[scrub(key)] = scrubDeep(item, scrub);
    return out;
  }
  return value;
}

/**
 * Builds the error for an answer of status >= 400 from its body text. `scrub` is applied
 * to every text of the error taken from the answer (the message, `title`, `detail`,
 * `instance`, `requestId` and every string of `problem`), so that a secret an upstream
 * echoed (the write key, a token) is in none of them; the class is chosen from the answer
 * as sent.
 */
export function errorFromResponse(
  status: number,
  bodyText: string,
  headers: { get(name: string): string | null },
  scrub: (text: string) => string = (text) => text,
): IdentityError {
  let parsed: unknown;
  try {
    parsed = JSON.parse(bodyText);
  } catch {
    parsed = undefined;
  }
  let rawType: string | undefined;
  let problem: Problem | undefined;
  if (parsed !== null && typeof parsed === "object" && !Array.isArray(parsed)) {
    const raw = parsed as Record<string, unknown>;
    if (typeof raw.type === "string" || typeof raw.title === "string") {
      rawType = typeof raw.type === "string" ? raw.type : undefined;
      const obj = scrubDeep(raw, scrub) as Record<string, unknown>;
      problem = {
        ...obj,
        type: typeof obj.type === "string" ? obj.type : "about:blank",
        title: typeof obj.title === "string" ? obj.title : `HTTP ${status}`,
        status: typeof obj.status === "number" ? obj.status : status,
      } as Problem;
    }
  }
  const slug = rawType?.startsWith(PROBLEM_PREFIX) ? rawType.slice(PROBLEM_PREFIX.length) : undefined;
  const bySlug = slug !== undefined && Object.hasOwn(BY_SLUG, slug) ? BY_SLUG[slug] : undefined;
  const cls: ErrorClass = bySlug ?? BY_STATUS[status] ?? APIError;
  // One of the service's own types is kept as sent (a short write key cannot mangle it).
  const type = bySlug !== undefined && rawType !== undefined ? rawType : (problem?.type ?? "about:blank");
  if (problem) problem.type = type;
  const title = problem?.title ?? `HTTP ${status}`;
  const detail = typeof problem?.detail === "string" ? problem.detail : undefined;
  const message = detail ? `${title}: ${detail}` : title;
  const requestId = headers.get("x-request-id");
  return new cls(`${message} (HTTP ${status})`, {
    status,
    type,
    title,
    detail,
    instance: typeof problem?.instance === "string" ? problem.instance : undefined,
    requestId: requestId === null ? undefined : scrub(requestId),
    retryAfter: parseRetryAfter(headers.get("retry-after")),
    problem,
  });
}
