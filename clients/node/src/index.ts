export { IdentityClient } from "./client.js";
export type {
  ExchangeOptions,
  Identity,
  IdentityClientOptions,
  JsonObject,
  PrepareParams,
  PreparedHandoff,
} from "./client.js";
export {
  APIError,
  AudienceMismatch,
  ConfigurationError,
  DestinationNotAllowed,
  EventTooLarge,
  IdentityConnectionError,
  IdentityError,
  InvalidRequest,
  PayloadTooLarge,
  PROBLEM_PREFIX,
  RateLimited,
  ServiceUnavailable,
  TokenNotFound,
  Unauthorized,
  UnsupportedMediaType,
} from "./errors.js";
export type { FieldError, IdentityErrorInit, Problem } from "./errors.js";
export { handoffMiddleware, readCookie } from "./middleware.js";
export type {
  HandoffMiddlewareOptions,
  MiddlewareRequest,
  MiddlewareResponse,
  NextFunction,
  RequestIdentity,
} from "./middleware.js";
