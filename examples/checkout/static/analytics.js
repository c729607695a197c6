/* analytics.js stand-in for the demo: a minimal Segment-compatible page script.
 *
 * It plays analytics.js's part and nothing more: loaded by the snippet's analytics.load(),
 * it reads the visitor's anonymousId from the ajs_anonymous_id cookie (or localStorage),
 * makes one when there is none, and sends page and track calls (Segment's spec) to the
 * collector it was loaded from, as analytics.js does to api.segment.io/v1/p and /v1/t.
 * Calls queued by the snippet are replayed, setAnonymousId first, as analytics.js does.
 */
(function (window, document) {
  "use strict";

  var COOKIE = "ajs_anonymous_id";
  var ONE_YEAR = 365 * 24 * 3600;
  var buffered = Array.isArray(window.analytics) ? window.analytics.slice() : [];
  var writeKey = window.analytics && window.analytics._writeKey;
  var api = new URL(document.currentScript.src).origin;
  var readyCallbacks = [];

  function plain(value) {
    if (!value) { return null; }
    try { value = decodeURIComponent(value); } catch (error) { return null; }
    if (value.charAt(0) === '"') {  // analytics.js writes the id as a JSON string
      try { value = JSON.parse(value); } catch (error) { return null; }
    }
    return typeof value === "string" && value ? value : null;
  }

  function readCookie(name) {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var equals = parts[i].indexOf("=");
      if (parts[i].slice(0, equals) === name) { return plain(parts[i].slice(equals + 1)); }
    }
    return null;
  }

  function readStorage() {
    try { return plain(window.localStorage.getItem(COOKIE)); } catch (error) { return null; }
  }

  function persist(id) {
    document.cookie = COOKIE + "=" + encodeURIComponent(id) + "; Path=/; Max-Age=" + ONE_YEAR +
      "; SameSite=Lax";
    try { window.localStorage.setItem(COOKIE, JSON.stringify(id)); } catch (error) { /* blocked */ }
  }

  var anonymousId = readCookie(COOKIE) || readStorage() || window.crypto.randomUUID();
  persist(anonymousId);

  function send(path, message) {
    message.anonymousId = anonymousId;
    message.messageId = "standin-" + window.crypto.randomUUID();
    message.timestamp = new Date().toISOString();
    message.writeKey = writeKey;
    message.context = {
      library: { name: "analytics-standin", version: "1.0.0" },
      page: {
        url: window.location.href,
        path: window.location.pathname,
        referrer: document.referrer,
        title: document.title
      },
      userAgent: navigator.userAgent
    };
    // text/plain, as analytics.js sends it: a simple request, no CORS preflight.
    return window.fetch(api + path, {
      method: "POST",
      headers: { "Content-Type": "text/plain" },
      body: JSON.stringify(message),
      keepalive: true
    }).catch(function () { /* a lost page view never breaks the page */ });
  }

  var analytics = {
    initialized: true,
    VERSION: "standin-1.0.0",
    user: function () { return { anonymousId: function () { return anonymousId; } }; },
    setAnonymousId: function (id) { anonymousId = String(id); persist(anonymousId); return analytics; },
    page: function (name, properties) {
      send("/v1/p", { type: "page", name: name || document.title, properties: properties || {} });
      return analytics;
    },
    track: function (event, properties) {
      return send("/v1/t", { type: "track", event: event, properties: properties || {} });
    },
    ready: function (callback) { readyCallbacks.push(callback); return analytics; }
  };

  window.analytics = analytics;
  var first = buffered.filter(function (call) { return call[0] === "setAnonymousId"; });
  var rest = buffered.filter(function (call) { return call[0] !== "setAnonymousId"; });
  first.concat(rest).forEach(function (call) {
    if (typeof analytics[call[0]] === "function") { analytics[call[0]].apply(analytics, call.slice(1)); }
  });
  analytics.ready = function (callback) { callback(); return analytics; };
  readyCallbacks.forEach(function (callback) { callback(); });
})(window, document);
