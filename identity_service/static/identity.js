/*! identity.js __IDENTITY_JS_VERSION__: identity-service's browser helper (docs/sdk.md, "Browser helper").
 *
 * One visitor, one anonymousId, across the domains you own, without putting the id in a URL.
 *
 * Domain A (links out): links and forms that point to a configured domain are decorated when
 * the visitor follows them: the helper POSTs the destination to your own backend
 * (tokenEndpoint, same origin), which prepares a handoff with the service and answers
 * {"redirectUrl": ...}; the browser then goes there. When that fails, the visitor goes to
 * the plain destination: a lost handoff never blocks a checkout.
 *
 * Domain B (lands, without the server middleware): a URL carrying the token parameter has
 * it removed from the address bar at once (history.replaceState, history.state kept), and
 * the token is POSTed to your own backend (exchangeEndpoint, same origin), which exchanges
 * it (with fallback) and answers {"anonymousId": ..., "source": ...}. The helper gives the id to
 * analytics.js (analytics.setAnonymousId; with the snippet's queue, ahead of the calls
 * queued) and writes the ajs_anonymous_id cookie; a generated id (a stale token) does not
 * replace the cookie of a visitor who already has one. Run analytics.load inside
 * IdentityHandoff.ready(...) so that analytics.js sends nothing before the id is set.
 *
 *   <script src="https://identity.example.com/v1/identity.js?v=__IDENTITY_JS_VERSION__"></script>
 *   <script>
 *     IdentityHandoff.init({
 *       domains: ["checkout.example-pay.com"],   // domain A: where links are decorated
 *       tokenEndpoint: "/handoff",               // domain A: your backend's prepare
 *       exchangeEndpoint: "/identity/exchange",  // domain B: your backend's exchange
 *       param: "handoff_token"                   // the token's query parameter
 *     });
 *   </script>
 *
 * or the same as attributes of the script tag itself: data-domains="a.com b.com",
 * data-token-endpoint, data-exchange-endpoint, data-param, data-cookie-name,
 * data-cookie-domain, data-timeout. cookieDomain (e.g. ".example-pay.com") is the cookie's
 * Domain, as the SDKs' middlewares' option: without it, or with one that is no domain name
 * (ignored, with a console warning), the cookie is host-only. A cookieName that is no token
 * (RFC 6265) or a cookieMaxAge that is no whole number of seconds from 1 to 400 days is
 * ignored the same way: its default is written; so is a param that is not ASCII letters,
 * digits, "_" or "-" (the service's own rule), and a __Secure- or __Host- cookieName on an
 * http page, or a __Host- one with a cookieDomain (a cookie the browser would drop). A
 * tokenEndpoint or exchangeEndpoint of another origin than the page's is ignored too (with
 * a console warning): neither is called.
 * No dependencies, no build step; ES5 plus fetch.
 */
(function (window, document) {
  "use strict";

  // Served, the script's version: a digest of this file (identity_service/browser_helper.py),
  // so that any change to it is a new version, and a new ?v= URL for every cache.
  var VERSION = "__IDENTITY_JS_VERSION__";
  var DEFAULTS = {
    domains: [],
    tokenEndpoint: null,
    exchangeEndpoint: null,
    param: "handoff_token",
    cookieName: "ajs_anonymous_id",
    cookieDomain: null,
    cookieMaxAge: 365 * 24 * 3600,
    timeout: 5000
  };
  var ONE_SHOT = "identityHandoffDecorating";
  var MAX_TIMER = 2147483647;  // setTimeout fires at once after a longer delay
  // A cookie's Domain: a domain name, its leading dot allowed; labels of letters, digits,
  // "-" (not at either end) and "_", 63 characters at most, 253 in all; two labels at least,
  // the last no number (NUMBER: an IPv4 address to a browser), as browsers set no Domain
  // cookie for a single label (localhost, .com) or an IP address (as the SDKs' check).
  var DOMAIN_LABEL = /^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$/;
  var NUMBER = /^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$/;
  // A cookie's name: a token (RFC 6265 4.1.1), as the SDKs' check.
  var COOKIE_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
  var MAX_COOKIE_AGE = 400 * 24 * 3600;  // browsers cut a longer Max-Age to 400 days
  // The token's query parameter: what the service's IDENTITY_TOKEN_PARAM may be (as the
  // SDKs' check); an empty one took every empty part of a query (?a&&b) for a token.
  var TOKEN_PARAM = /^[A-Za-z0-9_-]+$/;
  // A form's attributes the helper sets to submit it as its clicked button would have.
  var SUBMISSION = ["action", "method", "target", "enctype"];

  var config = null;
  var settled = false;
  var identity = null;
  var waiting = [];
  var busy = false;

  function merge(options) {
    var merged = {};
    var key;
    for (key in DEFAULTS) {
      if (Object.prototype.hasOwnProperty.call(DEFAULTS, key)) {
        merged[key] = options && options[key] != null ? options[key] : DEFAULTS[key];
      }
    }
    merged.domains = [].concat(merged.domains).map(function (domain) {
      return String(domain).toLowerCase().replace(/^\./, "");
    });
    // Milliseconds; anything but a finite positive number a timer can wait ("5s", 0,
    // Infinity: each would abort every call at once) is the default.
    var timeout = Number(merged.timeout);
    merged.timeout = isFinite(timeout) && timeout > 0 && timeout <= MAX_TIMER ? timeout : DEFAULTS.timeout;
    // Written into document.cookie as given, a ";" would add attributes, an "=" move the
    // name into the value, a space or an empty label make a cookie the browser refuses,
    // Max-Age=-5 delete it: each is ignored (its default is written), and said so.
    ownEndpoint(merged, "tokenEndpoint");
    ownEndpoint(merged, "exchangeEndpoint");
    if (typeof merged.param !== "string" || !TOKEN_PARAM.test(merged.param)) {
      ignore(merged, "param", "is not a parameter the service can send (ASCII letters, digits, " +
        "\"_\" or \"-\"); the parameter is " + DEFAULTS.param);
    }
    if (merged.cookieDomain && !isCookieDomain(merged.cookieDomain)) {
      ignore(merged, "cookieDomain", "is not a domain name browsers set a cookie for (no single label, no IP " +
        "address); the cookie is host-only");
    }
    if (typeof merged.cookieName !== "string" || !COOKIE_NAME.test(merged.cookieName)) {
      ignore(merged, "cookieName", "is not a cookie name (a token: no space, \";\", \",\" or \"=\"); " +
        "the cookie is " + DEFAULTS.cookieName);
    }
    var unfit = unfitPrefix(merged.cookieName, window.location.protocol === "https:", merged.cookieDomain);
    if (unfit) {
      ignore(merged, "cookieName", unfit + ", or the browser drops the cookie; the cookie is " +
        DEFAULTS.cookieName);
    }
    var maxAge = merged.cookieMaxAge;
    if (typeof maxAge !== "number" || maxAge % 1 !== 0 || maxAge < 1 || maxAge > MAX_COOKIE_AGE) {
      ignore(merged, "cookieMaxAge", "is not a whole number of seconds from 1 to " + MAX_COOKIE_AGE +
        "; the cookie is kept " + DEFAULTS.cookieMaxAge + " s");
    }
    return merged;
  }

  // Puts the default back for the option `name` of `merged`, with a console warning.
  function ignore(merged, name, why) {
    if (window.console && console.warn) {
      console.warn("identity.js: " + name + " " + JSON.stringify(String(merged[name])) + " " + why);
    }
    merged[name] = DEFAULTS[name];
  }

  // The endpoint option `name` of `merged` as an absolute URL, checked once here: of this
  // page's origin (the site's own backend, which gets the site's cookies), or ignored, with
  // a console warning (its default, none: that side does nothing). One of another origin
  // would be sent the visitor's anonymousId or the token to exchange.
  function ownEndpoint(merged, name) {
    if (!merged[name]) { return; }
    var url = parse(String(merged[name]));
    if (url && (url.protocol === "https:" || url.protocol === "http:") &&
        url.origin === window.location.origin) {
      merged[name] = url.href;
    } else {
      ignore(merged, name, "is not of this page's origin (" + window.location.origin +
        "): the token and the visitor's id go to your own backend only; it is not called");
    }
  }

  // What a cookie named `name` lacks for its name's prefix (RFC 6265bis 4.1.3, matched in
  // any case; as the SDKs' check), or null: __Secure- needs Secure (written on https pages
  // only), __Host- too and no Domain (its Path is always "/").
  function unfitPrefix(name, secure, domain) {
    var prefix = name.slice(0, 9).toLowerCase();
    var host = prefix.indexOf("__host-") === 0;
    if (!host && prefix !== "__secure-") { return null; }
    if (!secure) { return "needs an https page (Secure)"; }
    if (host && domain) { return "cannot have a cookieDomain (a __Host- cookie is host-only)"; }
    return null;
  }

  function isCookieDomain(domain) {
    if (typeof domain !== "string") { return false; }
    var name = domain.charAt(0) === "." ? domain.slice(1) : domain;
    var labels = name.split(".");
    if (labels.length < 2 || NUMBER.test(labels[labels.length - 1])) { return false; }
    for (var i = 0; i < labels.length; i++) {
      if (!DOMAIN_LABEL.test(labels[i])) { return false; }
    }
    return name.length <= 253;
  }

  // A POST of JSON to the site's own backend; resolves with the parsed answer or rejects.
  function postJSON(url, body) {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = controller ? setTimeout(function () { controller.abort(); }, config.timeout) : null;
    return window.fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body),
      signal: controller ? controller.signal : undefined
    }).then(function (response) {
      if (!response.ok) {
        throw new Error("identity.js: " + url + " answered " + response.status);
      }
      return response.json();
    }).then(function (answer) {
      if (timer) { clearTimeout(timer); }
      return answer;
    }, function (error) {
      if (timer) { clearTimeout(timer); }
      throw error;
    });
  }

  // ---- Domain A: decorate links and forms at click and submit time ----

  function isHandedOff(url) {
    if (url.protocol !== "https:" && url.protocol !== "http:") { return false; }
    if (url.host === window.location.host) { return false; }
    var host = url.hostname.toLowerCase();
    for (var i = 0; i < config.domains.length; i++) {
      var domain = config.domains[i];
      if (host === domain || host.slice(-domain.length - 1) === "." + domain) { return true; }
    }
    return false;
  }

  function parse(href) {
    try { return new URL(href, document.baseURI || window.location.href); } catch (error) { return null; }
  }

  // The browsing context a link's or a form's target names, for the targets the helper
  // takes: none or _self (this one), _top and _parent (in a frame, the top or the parent
  // page). Null for the others (_blank, a named window or frame): they open or name
  // another context, which a navigation after the backend's answer could not open (popup
  // blockers) or find; those are followed as they are, undecorated.
  function contextOf(target) {
    var name = String(target == null ? baseTarget() : target).toLowerCase();
    if (name === "" || name === "_self") { return window; }
    if (name === "_top") { return window.top; }
    if (name === "_parent") { return window.parent; }
    return null;
  }

  // The page's default target (<base target>), for a link or form without one.
  function baseTarget() {
    var base = document.querySelector("base[target]");
    return base ? base.getAttribute("target") : "";
  }

  // Navigates the browsing context `target` names. Where the browser would not let this
  // page navigate it (a sandboxed frame), nothing happens, as with the plain link.
  function navigate(target, url) {
    try {
      contextOf(target).location.href = url;  // href: allowed on a cross-origin top too
    } catch (error) { /* not allowed */ }
  }

  function currentAnonymousId() {
    var analytics = window.analytics;
    try {
      if (analytics && typeof analytics.user === "function") {
        return analytics.user().anonymousId() || null;
      }
    } catch (error) { /* analytics.js not ready: the backend reads the cookie */ }
    return null;
  }

  // The redirect URL for destination, or null when the backend could not make one.
  function freshRedirect(destination) {
    var body = { destination: destination };
    var anonymousId = currentAnonymousId();
    if (anonymousId) { body.anonymousId = anonymousId; }  // in the body, never in a URL
    return postJSON(config.tokenEndpoint, body).then(function (answer) {
      var redirect = answer && typeof answer.redirectUrl === "string" ? parse(answer.redirectUrl) : null;
      return redirect && isHandedOff(redirect) ? redirect : null;
    }, function () { return null; });
  }

  function onClick(event) {
    if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey ||
        event.shiftKey || event.altKey) { return; }
    var link = event.target && event.target.closest ? event.target.closest("a[href]") : null;
    if (!link || link.hasAttribute("download")) { return; }
    var target = link.getAttribute("target");
    if (!contextOf(target)) { return; }
    var destination = parse(link.href);
    if (!destination || !isHandedOff(destination) || busy) { return; }
    event.preventDefault();
    busy = true;
    freshRedirect(destination.href).then(function (redirect) {
      busy = false;
      navigate(target, redirect ? redirect.href : destination.href);
    });
  }

  function hiddenInput(form, name, value) {
    var input = document.createElement("input");
    input.type = "hidden";
    input.name = name;
    input.value = value;
    input.setAttribute("data-identity-handoff", "");
    form.appendChild(input);
  }

  // Sets a form's attributes, the first time keeping what they were for reset().
  function setAttributes(form, values) {
    for (var i = 0; i < SUBMISSION.length; i++) {
      var name = SUBMISSION[i];
      if (values[name] == null) { continue; }
      var saved = "data-identity-handoff-" + name;
      if (!form.hasAttribute(saved)) {
        // "=" + the value, or "" when the form had no such attribute.
        form.setAttribute(saved, form.hasAttribute(name) ? "=" + form.getAttribute(name) : "");
      }
      form.setAttribute(name, values[name]);
    }
  }

  // Back on this page from the back-forward cache: nothing is in flight, and forms are
  // decorated afresh (their token was used), with their own attributes back.
  function reset() {
    busy = false;
    var added = document.querySelectorAll("input[data-identity-handoff]");
    for (var i = 0; i < added.length; i++) { added[i].parentNode.removeChild(added[i]); }
    var forms = document.querySelectorAll("form[data-identity-handoff-decorating]");
    for (var j = 0; j < forms.length; j++) {
      delete forms[j].dataset[ONE_SHOT];
      for (var k = 0; k < SUBMISSION.length; k++) {
        var saved = "data-identity-handoff-" + SUBMISSION[k];
        if (!forms[j].hasAttribute(saved)) { continue; }
        var value = forms[j].getAttribute(saved);
        if (value) { forms[j].setAttribute(SUBMISSION[k], value.slice(1)); } else { forms[j].removeAttribute(SUBMISSION[k]); }
        forms[j].removeAttribute(saved);
      }
    }
  }

  // The submission as the browser would make it: the clicked button's formaction,
  // formmethod, formtarget and formenctype win over the form's own attributes.
  function submissionOf(form, submitter) {
    function pick(own, name) {
      if (submitter && submitter.hasAttribute(own)) { return submitter.getAttribute(own); }
      return form.getAttribute(name);
    }
    var method = (pick("formmethod", "method") || "get").toLowerCase();
    return {
      action: pick("formaction", "action") || window.location.href,  // empty: this page
      method: method === "post" || method === "dialog" ? method : "get",
      target: pick("formtarget", "target"),
      enctype: pick("formenctype", "enctype")
    };
  }

  function onSubmit(event) {
    var form = event.target;
    if (event.defaultPrevented || !form || form.tagName !== "FORM" || form.dataset[ONE_SHOT]) {
      return;
    }
    var submitter = event.submitter || null;
    var submission = submissionOf(form, submitter);
    if (submission.method === "dialog" || !contextOf(submission.target)) { return; }
    var action = parse(submission.action);
    if (!action || !isHandedOff(action) || busy) { return; }
    event.preventDefault();
    busy = true;
    freshRedirect(action.href).then(function (redirect) {
      busy = false;
      var token = redirect ? redirect.searchParams.get(config.param) : null;
      // submit() ignores the button: the form gets the submission's attributes itself.
      var values = {
        action: action.href,
        method: submission.method,
        target: submission.target,
        enctype: submission.enctype
      };
      if (token) {
        if (submission.method === "get") {
          // A GET form's fields replace the action's query: the token becomes a field.
          hiddenInput(form, config.param, token);
        } else {
          values.action = redirect.href;
        }
      }
      setAttributes(form, values);
      if (submitter && submitter.name) { hiddenInput(form, submitter.name, submitter.value); }
      form.dataset[ONE_SHOT] = "1";
      form.submit();  // submit() fires no submit event: the form is not decorated twice
    });
  }

  // ---- Domain B: take the token, exchange it through the backend, hand the id over ----

  function decode(text) {
    try { return decodeURIComponent(text.replace(/\+/g, " ")); } catch (error) { return text; }
  }

  // The token in the page's query and the URL without it, the other parameters kept as
  // they were written, in order.
  function withoutToken(location) {
    var token = null;
    var kept = [];
    var parts = location.search.replace(/^\?/, "").split("&");
    for (var i = 0; i < parts.length; i++) {
      var part = parts[i];
      var equals = part.indexOf("=");
      var name = decode(equals < 0 ? part : part.slice(0, equals));
      if (name === config.param) {
        if (token === null) { token = decode(equals < 0 ? "" : part.slice(equals + 1)); }
      } else if (part) {
        kept.push(part);
      }
    }
    if (token === null) { return null; }
    return {
      token: token,
      clean: location.pathname + (kept.length ? "?" + kept.join("&") : "") + location.hash
    };
  }

  // The visitor's id in the cookie, read as the SDKs' middlewares read it (as is,
  // percent-encoded, or JSON-quoted as analytics.js classic writes it), or null.
  function cookieId() {
    var items = document.cookie ? document.cookie.split(";") : [];
    for (var i = 0; i < items.length; i++) {
      var item = items[i].replace(/^\s+/, "");
      var equals = item.indexOf("=");
      if (equals > 0 && item.slice(0, equals) === config.cookieName) {
        var value = item.slice(equals + 1).replace(/^\s+|\s+$/g, "").replace(/^"+|"+$/g, "");
        try { value = decodeURIComponent(value); } catch (error) { /* kept as written */ }
        return value.replace(/^"+|"+$/g, "") || null;
      }
    }
    return null;
  }

  function writeCookie(anonymousId) {
    var secure = window.location.protocol === "https:" ? "; Secure" : "";
    var domain = config.cookieDomain ? "; Domain=" + config.cookieDomain : "";
    document.cookie = config.cookieName + "=" + encodeURIComponent(anonymousId) +
      "; Path=/; Max-Age=" + config.cookieMaxAge + domain + "; SameSite=Lax" + secure;
  }

  function giveToAnalytics(anonymousId) {
    var analytics = window.analytics;
    try {
      if (analytics && Array.isArray(analytics) && !analytics.initialized) {
        // The snippet's queue: first, so the page and track calls queued use the id.
        analytics.unshift(["setAnonymousId", anonymousId]);
      } else if (analytics && typeof analytics.setAnonymousId === "function") {
        analytics.setAnonymousId(anonymousId);
      }
    } catch (error) { /* a broken analytics.js must not break the page */ }
    writeCookie(anonymousId);
  }

  function settle(result) {
    if (settled) { return; }
    settled = true;
    identity = result;
    var callbacks = waiting;
    waiting = [];
    for (var i = 0; i < callbacks.length; i++) { run(callbacks[i]); }
  }

  function run(callback) {
    try { callback(identity); } catch (error) {
      setTimeout(function () { throw error; }, 0);  // reported, and the others still run
    }
  }

  function restore() {
    var found = config.exchangeEndpoint ? withoutToken(window.location) : null;
    if (!found) {
      settle(null);
      return;
    }
    // First of all: the token leaves the address bar, history and later Referer headers.
    try { window.history.replaceState(window.history.state, "", found.clean); } catch (error) { /* sandboxed */ }
    postJSON(config.exchangeEndpoint, {
      token: found.token,
      url: window.location.href,
      referrer: document.referrer || null
    }).then(function (answer) {
      if (!answer || typeof answer.anonymousId !== "string" || !answer.anonymousId) {
        settle(null);
        return;
      }
      var kept = answer.source === "generated" ? cookieId() : null;
      if (kept) {
        // A stale token (a reloaded or bookmarked handoff URL) does not replace the id a
        // returning visitor already has: the cookie stays, as with the SDKs' middlewares.
        settle({ anonymousId: kept, source: "cookie" });
        return;
      }
      giveToAnalytics(answer.anonymousId);
      settle({ anonymousId: answer.anonymousId, source: answer.source || "handoff" });
    }, function () { settle(null); });
  }

  function fromScriptTag() {
    var script = document.currentScript;
    if (!script || !script.hasAttribute("data-domains") && !script.hasAttribute("data-exchange-endpoint")) {
      return null;
    }
    var data = script.dataset;
    return {
      domains: (data.domains || "").split(/[\s,]+/).filter(Boolean),
      tokenEndpoint: data.tokenEndpoint,
      exchangeEndpoint: data.exchangeEndpoint,
      param: data.param,
      cookieName: data.cookieName,
      cookieDomain: data.cookieDomain,
      timeout: data.timeout ? Number(data.timeout) : null
    };
  }

  var IdentityHandoff = {
    version: VERSION,

    // Configure and start; a second call is ignored (the first configuration stays).
    init: function (options) {
      if (config) { return IdentityHandoff; }
      config = merge(options);
      if (config.tokenEndpoint && config.domains.length) {
        document.addEventListener("click", onClick, false);
        document.addEventListener("submit", onSubmit, false);
        window.addEventListener("pageshow", reset, false);
      }
      restore();
      return IdentityHandoff;
    },

    // callback(identity) once the landing is settled: {anonymousId, source} when a token
    // was exchanged, null otherwise (no token, backend failed). Run analytics.load in it.
    ready: function (callback) {
      if (settled) { run(callback); } else { waiting.push(callback); }
      return IdentityHandoff;
    }
  };

  window.IdentityHandoff = IdentityHandoff;
  var tagged = fromScriptTag();
  if (tagged) { IdentityHandoff.init(tagged); }
})(window, document);
