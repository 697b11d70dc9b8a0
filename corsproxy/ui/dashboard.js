// corsproxy's admin page. Reads the admin listener's JSON and builds the page.
//
// Every value that came from the proxy's traffic or config (an Origin is any visible
// ASCII an attacker chose) is put into the page with text nodes only: this file never
// uses innerHTML, outerHTML, insertAdjacentHTML or document.write, and never puts a
// value into an href, src, style or event attribute.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const TIMEOUT_MS = 8000;
  const FIELDS = [
    "allow_origins", "allow_origin_regex", "allow_methods", "allow_headers",
    "allow_credentials", "expose_headers", "max_age", "allow_private_network",
    "enforce", "check_websocket_origin", "report_only",
  ];
  const REASONS = {
    origin: "the Origin is not allowed",
    method: "the method is not in allow_methods",
    headers: "a requested header is not in allow_headers",
    "private-network": "private network access is not allowed",
  };
  const DIRECTIONS = {
    policy_stricter: ["policy stricter", "bad",
      "the upstream allows it, the policy would not: enforcing the policy would break this"],
    policy_looser: ["policy looser", "warn",
      "the policy would allow what the upstream's answer does not"],
    headers_differ: ["headers differ", "info",
      "both allow, with different CORS header values"],
  };

  const state = {
    policy: null,
    status: null,
    seen: {},       // endpoint -> the JSON text last rendered (unchanged: not rebuilt)
    busy: false,
    timer: null,
  };

  // -- building nodes (text only) ---------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [name, value] of Object.entries(attrs)) {
        if (value === null || value === undefined || value === false) continue;
        if (name === "class") node.className = value;
        else node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    add(node, children);
    return node;
  }

  function add(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach((c) => add(node, c));
    else if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }

  function $(id) {
    return document.getElementById(id);
  }

  function fill(id, ...children) {
    const node = $(id);
    node.replaceChildren();
    add(node, children);
  }

  function chip(text, kind, title) {
    return el("span", { class: `chip ${kind || ""}`.trim(), title }, text);
  }

  function code(text) {
    return el("code", null, text);
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  // An ISO time as local "HH:MM:SS" (today) or "YYYY-MM-DD HH:MM:SS"; ISO in the title.
  function time(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return el("span", null, String(iso));
    const now = new Date();
    const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    const today = d.toDateString() === now.toDateString();
    const text = today ? clock
      : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock}`;
    return el("time", { datetime: iso, title: `${iso} (UTC)` }, text);
  }

  function routeName(route) {
    return route === null || route === undefined ? "(top-level cors)" : route;
  }

  function origin(value) {
    return value === "" ? el("span", { class: "empty" }, "(empty)") : value;
  }

  // -- fetching -----------------------------------------------------------------------

  async function getJSON(url, { allowError = false } = {}) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
    try {
      const response = await fetch(url, {
        cache: "no-store",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        signal: abort.signal,
      });
      const text = await response.text();
      let data;
      try {
        data = JSON.parse(text);
      } catch {
        throw new Error(`${url}: HTTP ${response.status}, not JSON`);
      }
      if (!response.ok && !(allowError && data && typeof data.error === "string")) {
        throw new Error(`${url}: HTTP ${response.status}`);
      }
      return { ok: response.ok, status: response.status, data, text };
    } catch (error) {
      if (error.name === "AbortError") throw new Error(`${url}: no answer within 8 s`);
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  // -- the header: status -------------------------------------------------------------

  function renderStatus(s) {
    $("version").textContent = s.version;
    const ready = $("readiness");
    ready.textContent = s.readiness === "ready" ? "ready" : s.readiness;
    ready.className = `chip ${s.ready ? "ok" : "bad"}`;
    fill("facts",
      el("div", null, el("dt", null, "config"), el("dd", null, s.config)),
      el("div", null, el("dt", null, "upstream"), el("dd", null, s.upstream)),
      el("div", null, el("dt", null, "pid"), el("dd", null, s.pid)),
      el("div", null, el("dt", null, "policy loaded"), el("dd", null, time(s.loaded_at))));

    const last = s.last_reload;
    const rows = [
      ["Policy in use loaded", time(s.loaded_at)],
      ["Reloads", `${s.reloads.success} succeeded, ${s.reloads.failure} failed`],
    ];
    if (last) {
      rows.push(["Last reload", [
        chip(last.result, last.result === "success" ? "ok" : "bad"), " ", time(last.at),
        last.result === "failure" ? " (the previous policy stays in use)" : "",
      ]]);
    } else {
      rows.push(["Last reload", el("span", { class: "empty" },
        "none since start-up (SIGHUP, or save the config file)")]);
    }
    rows.push(["Config file", code(s.config)]);
    rows.push(["Process", `pid ${s.pid} (with several workers, each one reloads and counts `
      + "on its own; this is the one that answered)"]);
    const dl = el("dl", { class: "reload" },
      rows.map(([name, value]) => [el("dt", null, name), el("dd", null, value)]));
    const parts = [dl];
    if (last && last.errors && last.errors.length) {
      parts.push(el("h4", null, "Errors of the last reload"),
        el("pre", { class: "errors", id: "reload-errors" }, last.errors.join("\n")));
    }
    fill("reload-status", parts);
  }

  // -- the policy ---------------------------------------------------------------------

  function list(values, none) {
    if (!values || values.length === 0) return el("span", { class: "empty" }, none);
    return el("span", { class: "list" }, values.map((v) => code(v)));
  }

  // allow_origin_regex: one pattern, a list of them, or none.
  function regexes(value) {
    if (Array.isArray(value)) return value;
    return value ? [value] : [];
  }

  function describe(name, value, settings, safelisted) {
    switch (name) {
      case "allow_origins":
        if (value.length === 0) {
          return el("span", { class: "empty" }, regexes(settings.allow_origin_regex).length
            ? "(none: only allow_origin_regex)" : "(none: no origin is allowed)");
        }
        if (value.includes("*")) return [code("*"), " any origin"];
        return list(value, "(none)");
      case "allow_origin_regex":
        return list(regexes(value), "(none)");
      case "allow_methods":
        return value.includes("*") ? "any method (the requested one is echoed)"
          : list(value, "(none)");
      case "allow_headers":
        if (value.includes("*")) return "any header (the requested names are echoed)";
        return [list(value, "(none)"),
          el("span", { class: "sub" }, ` plus ${safelisted.join(", ")}`)];
      case "expose_headers":
        return list(value, "(none)");
      case "max_age":
        return `${value} s`;
      case "enforce":
        return value ? "true: cross-origin requests from other origins get 403"
          : "false: other origins are forwarded, without CORS headers";
      case "check_websocket_origin":
        return value ? "true: WebSocket handshakes from other origins get 403"
          : "false: WebSocket handshakes from any page are forwarded";
      case "report_only":
        return value ? "true: forwarded whatever the verdict; differences are reported below"
          : "false";
      default:
        if (Array.isArray(value)) return list(value, "(none)");
        if (value === null) return el("span", { class: "empty" }, "(none)");
        return String(value);
    }
  }

  function renderPolicy(p) {
    const cards = p.policies.map((policy) => {
      const s = policy.settings;
      const overrides = new Set(policy.overrides);
      const names = FIELDS.filter((f) => f in s).concat(
        Object.keys(s).filter((f) => !FIELDS.includes(f)));
      const rows = names.map((name) => el("tr",
        { class: overrides.has(name) ? "override" : null, "data-field": name },
        el("th", { scope: "row" }, name),
        el("td", { class: "value" }, describe(name, s[name], s, p.safelisted_headers),
          overrides.has(name) ? el("span", { class: "mark" }, "← set by this route") : null)));
      if (policy.upstream) {
        rows.push(el("tr", { class: "override", "data-field": "upstream" },
          el("th", { scope: "row" }, "upstream timeouts"),
          el("td", { class: "value" },
            `timeout: ${seconds(policy.upstream.timeout)}, `
            + `read_timeout: ${seconds(policy.upstream.read_timeout)}`,
            el("span", { class: "mark" }, "← set by this route"))));
      }
      const chips = [];
      if (policy.report_only) {
        chips.push(chip("report-only", "warn",
          "forwarded whatever the verdict; disagreements with the upstream are reported"));
      } else if (s.enforce) {
        chips.push(chip("enforce", "info"));
      }
      if (policy.route !== null) {
        chips.push(overrides.size
          ? chip(`${overrides.size} override${overrides.size === 1 ? "" : "s"}`, "info")
          : chip("same as top-level"));
      }
      return el("article", {
        class: `policy${policy.report_only ? " report-only" : ""}`,
        "data-route": policy.route === null ? "" : policy.route,
      },
      el("div", { class: "policy-head" }, el("h3", null, policy.label), chips),
      el("p", { class: "matches" }, policy.matches),
      el("table", { class: "fields" }, el("tbody", null, rows)));
    });
    const parts = [cards];
    if (p.warnings.length) {
      parts.push(el("div", { class: "warnings" }, el("strong", null, "Warnings"),
        el("ul", null, p.warnings.map((w) => el("li", null, w)))));
    }
    fill("policies", parts);
  }

  function seconds(value) {
    return value === null ? "no limit" : `${value} s`;
  }

  // -- denied origins and disagreements ------------------------------------------------

  function table(columns, rows, id) {
    return el("div", { class: "scroll" }, el("table", { class: "data", id },
      el("thead", null, el("tr", null, columns.map((c) => el("th", { scope: "col" }, c)))),
      el("tbody", null, rows)));
  }

  function renderDenied(d) {
    const n = d.denied.length;
    $("denied-count").textContent = n ? `(${n})` : "";
    if (n === 0) {
      fill("denied-list", el("p", { class: "empty" },
        "No denied request since the proxy started."));
      return;
    }
    const rows = d.denied.map((e) => el("tr", null,
      el("td", { class: "origin" }, origin(e.origin)),
      el("td", { class: "mono" }, routeName(e.route)),
      el("td", { title: REASONS[e.reason] || null }, e.reason),
      el("td", { class: "num" }, e.count),
      el("td", { class: "time" }, time(e.first_seen)),
      el("td", { class: "time" }, time(e.last_seen)),
      el("td", null, explainButton(e))));
    fill("denied-list", table(
      ["Origin", "Route", "Reason", "Count", "First seen", "Last seen", ""], rows,
      "denied-table"),
    el("p", { class: "hint" }, `Keeps the last ${d.kept} distinct entries.`));
  }

  function explainButton(entry) {
    const button = el("button", { type: "button", class: "small",
      title: "fill the explain form with this origin and route" }, "explain");
    button.addEventListener("click", () => {
      const form = $("explain-form");
      form.reset();
      $("ex-origin").value = entry.origin;
      $("ex-path").value = entry.route || "/";
      if (entry.kind === "websocket") $("ex-websocket").checked = true;
      $("explain").scrollIntoView();
      $("ex-origin").focus();
    });
    return button;
  }

  function renderReport(r) {
    const n = r.disagreements.length;
    $("report-count").textContent = n ? `(${n})` : "";
    if (n === 0) {
      const any = state.policy && state.policy.policies.some((p) => p.report_only);
      fill("report-list", el("p", { class: "empty" }, any
        ? "No disagreement so far: the upstream and the report-only policy agreed."
        : "No route is report_only (set cors.report_only: true on one to try a policy "
          + "without enforcing it)."));
      return;
    }
    const rows = r.disagreements.map((e) => {
      const [label, kind, title] = DIRECTIONS[e.direction] || [e.direction, "", null];
      return el("tr", null,
        el("td", { class: "origin" }, origin(e.origin)),
        el("td", { class: "mono" }, routeName(e.route)),
        el("td", null, e.kind),
        el("td", null, chip(label, kind, title)),
        el("td", { class: "detail" }, e.detail),
        el("td", { class: "num" }, e.count),
        el("td", { class: "time" }, time(e.first_seen)),
        el("td", { class: "time" }, time(e.last_seen)));
    });
    fill("report-list", table(
      ["Origin", "Route", "Kind", "Direction", "Detail", "Count", "First seen", "Last seen"],
      rows, "report-table"),
    el("p", { class: "hint" }, `Keeps the last ${r.kept} distinct entries.`));
  }

  // -- refreshing ---------------------------------------------------------------------

  const SOURCES = [
    ["status", "/api/status", (data) => { state.status = data; renderStatus(data); }],
    ["policy", "/api/policy", (data) => { state.policy = data; renderPolicy(data); }],
    ["denied", "/denied", renderDenied],
    ["report", "/api/report", renderReport],
  ];

  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    clearTimeout(state.timer);
    try {
      const results = await Promise.allSettled(SOURCES.map(([, url]) => getJSON(url)));
      const problems = [];
      results.forEach((result, i) => {
        const [name, , render] = SOURCES[i];
        if (result.status === "rejected") {
          problems.push(result.reason.message || String(result.reason));
          return;
        }
        let key = result.value.text;
        if (name === "status") key = JSON.stringify({ ...result.value.data, now: null });
        if (state.seen[name] === key) return;  // unchanged: keep the nodes (and selections)
        try {
          render(result.value.data);
          state.seen[name] = key;
          // The report's empty text depends on the policy: rebuild it after a change.
          if (name === "policy") delete state.seen.report;
        } catch (error) {
          problems.push(`${name}: ${error.message}`);
        }
      });
      const problem = $("problem");
      if (problems.length) {
        problem.textContent = `Cannot read the admin listener: ${problems.join("; ")}. `
          + "Showing the last data read.";
        problem.hidden = false;
      } else {
        problem.hidden = true;
        problem.textContent = "";
      }
      const now = new Date();
      $("updated").textContent = problems.length ? "update failed"
        : `updated ${pad(now.getHours())}:${pad(now.getMinutes())}:${pad(now.getSeconds())}`;
    } finally {
      state.busy = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    if ($("auto").checked && !document.hidden) state.timer = setTimeout(refresh, REFRESH_MS);
  }

  // -- explain ------------------------------------------------------------------------

  function explainParams(form) {
    const params = new URLSearchParams();
    for (const name of ["origin", "method", "path", "request_method", "request_headers",
      "host"]) {
      const value = form.elements[name].value;
      if (value !== "") params.set(name, value);
    }
    for (const name of ["request_private_network", "websocket"]) {
      if (form.elements[name].checked) params.set(name, "1");
    }
    return params;
  }

  function shellQuote(value) {
    return /^[A-Za-z0-9_\/.:,=@%+-]+$/.test(value) ? value
      : `'${value.replace(/'/g, "'\\''")}'`;
  }

  function cliCommand(params, config) {
    const words = ["corsproxy", "explain", "--config", shellQuote(config || "FILE")];
    for (const [name, value] of params) {
      const option = `--${name.replace(/_/g, "-")}`;
      if (name === "request_private_network" || name === "websocket") words.push(option);
      else words.push(option, shellQuote(value));
    }
    return words.join(" ");
  }

  function statusText(x) {
    let text = x.status === null
      ? "forwarded upstream (corsproxy replaces the upstream's Access-Control-* headers "
        + "with the ones below and merges Vary)"
      : `${x.status} (answered by corsproxy, not forwarded)`;
    if (x.report_only) {
      text = "forwarded upstream (report_only); enforced, this policy would answer: " + text;
    }
    return text;
  }

  function verdictKind(verdict) {
    if (verdict === "allowed") return "ok";
    if (verdict === "denied" || verdict === "rejected") return "bad";
    return "";
  }

  function renderExplain(x, params) {
    const label = x.route === null ? "(top-level cors)" : x.route;
    const headerRows = Object.entries(x.headers).map(([name, value]) => el("tr", null,
      el("th", { scope: "row", class: "mono" }, name), el("td", { class: "mono value" }, value)));
    const requestRows = x.request.headers.map(([name, value]) => el("tr", null,
      el("th", { scope: "row", class: "mono" }, name), el("td", { class: "mono value" }, value)));
    const parts = [
      el("div", { class: "verdict-line" },
        el("span", { class: `chip verdict ${verdictKind(x.verdict)}`, id: "explain-verdict" },
          x.verdict),
        chip(x.kind, "", "kind of request"),
        chip(`route ${label}`, "info"),
        x.report_only ? chip("report-only", "warn") : null),
      el("p", { id: "explain-status" }, statusText(x)),
      el("h4", null, "Request"),
      el("p", { class: "mono", id: "explain-request" }, `${x.request.method} ${x.request.path}`),
      requestRows.length ? el("table", { class: "data fields" }, el("tbody", null, requestRows))
        : null,
      el("h4", null, "Reasons"),
      el("ul", { id: "explain-reasons" }, x.reasons.map((r) => el("li", null, r))),
      el("h4", null, "Response headers"),
      el("table", { class: "data fields", id: "explain-headers" }, el("tbody", null, headerRows)),
    ];
    if (x.body) {
      parts.push(el("h4", null, "Body"), el("pre", { class: "body", id: "explain-body" }, x.body));
    }
    parts.push(el("h4", null, "The same from a shell"),
      el("p", { class: "command", id: "explain-command" }, cliCommand(params, x.config)),
      el("details", null, el("summary", null, "JSON (as corsproxy explain --json prints it)"),
        el("pre", { class: "json", id: "explain-json" }, JSON.stringify(x, null, 2))));
    fill("explain-result", parts);
  }

  async function explain(event) {
    event.preventDefault();
    const params = explainParams(event.target);
    const button = $("ex-submit");
    button.disabled = true;
    try {
      const answer = await getJSON(`/api/explain?${params}`, { allowError: true });
      if (answer.ok) renderExplain(answer.data, params);
      else fill("explain-result", el("p", { class: "error", id: "explain-error" },
        answer.data.error));
    } catch (error) {
      fill("explain-result", el("p", { class: "error", id: "explain-error" },
        `Cannot ask the admin listener: ${error.message}`));
    } finally {
      button.disabled = false;
    }
  }

  // -- start ----------------------------------------------------------------------------

  function start() {
    $("refresh").addEventListener("click", () => {
      state.seen = {};  // a forced refresh rebuilds everything
      refresh();
    });
    $("auto").addEventListener("change", schedule);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
      else clearTimeout(state.timer);
    });
    $("explain-form").addEventListener("submit", explain);
    $("explain-form").addEventListener("reset", () => fill("explain-result"));
    refresh();
  }

  start();
})();
