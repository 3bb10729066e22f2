// kiln's web page: the pushes of a branch, builders, builds with live logs, workers
// and the config in force. It reads /api/v2/ and follows /api/v2/events;
// everything it shows from the store goes through textContent, never HTML.
"use strict";

const RESULTS = ["success", "warnings", "failure", "skipped", "exception", "retry", "cancelled"];
const main = () => document.getElementById("main");
let page = { close() {} };
// Each route is a generation: a page draws into the main element only
// while it is the page shown, so a draw still under way (a fetch, a
// debounced redraw) when the user moves on lands nowhere.
let generation = 0;
const viewOf = () => {
  const mine = generation;
  const nowhere = document.createElement("div");
  return () => (mine === generation ? main() : nowhere);
};

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path) {
  const r = await fetch("/api/v2/" + path, { credentials: "same-origin" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

async function rpc(path, method, params) {
  const r = await fetch("/api/v2/" + path, {
    method: "POST",
    credentials: "same-origin",
    headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
    body: JSON.stringify({ jsonrpc: "2.0", id: 1, method, params: params || {} }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && (body.error.message || body.error)) || `${r.status}`);
  return body.result;
}

/// Only web addresses become links (a change's revlink comes from outside).
function safeUrl(u) {
  return typeof u === "string" && /^https?:\/\//i.test(u) ? u : null;
}

function when(ts) {
  if (!ts) return "";
  const d = new Date(ts * 1000);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function duration(a, b) {
  if (!a) return "";
  const s = Math.max(0, (b || Date.now() / 1000) - a);
  return s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
}

function resultName(results, complete) {
  if (!complete && (results === null || results === undefined)) return "running";
  return RESULTS[results] || "exception";
}

function badge(results, complete, text, href) {
  const name = resultName(results, complete);
  return h(href ? "a" : "span", { class: `res ${name}`, href, title: name }, text ?? name);
}

/// Follows the event stream; `onEvent(topic, event)` for each one.
function follow(query, onEvent) {
  const live = document.getElementById("live");
  const es = new EventSource("/api/v2/events" + (query ? "?" + query : ""));
  es.onopen = () => live.classList.add("on");
  es.onerror = () => live.classList.remove("on");
  const topics = ["changes", "buildsets", "buildrequests", "builds", "steps", "logs", "workers", "reloads", "lagged"];
  for (const t of topics) {
    es.addEventListener(t, (m) => {
      let data = {};
      try { data = JSON.parse(m.data); } catch (_) { return; }
      onEvent(t, data);
    });
  }
  return es;
}

function debounce(fn, ms) {
  let t = null;
  return () => { clearTimeout(t); t = setTimeout(fn, ms); };
}

function fail(e) {
  main().replaceChildren(h("p", { class: "error" }, String(e.message || e)));
}

// ---- Signing in -------------------------------------------------------

// The credentials of the user signed in through the page's form (HTTP
// Basic, kept for this tab only); writes and /api/v2/access carry them.
const AUTH_KEY = "kiln-auth";
const authHeaders = () => {
  const a = sessionStorage.getItem(AUTH_KEY);
  return Object.assign({ "X-Requested-With": "kiln" }, a ? { Authorization: "Basic " + a } : {});
};

/// Who the page acts as and what it may do: `{user, may: [actions]}`.
async function whoami() {
  const r = await fetch("/api/v2/access", { credentials: "same-origin", headers: authHeaders() });
  if (r.status === 401) { sessionStorage.removeItem(AUTH_KEY); return { user: null, may: [] }; }
  return r.ok ? r.json() : { user: null, may: [] };
}

async function drawWho() {
  const who = document.getElementById("who");
  const me = await whoami().catch(() => ({ user: null, may: [] }));
  const form = h("form", { class: "signin", hidden: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const user = form.querySelector("[name=user]").value;
    const password = form.querySelector("[name=password]").value;
    const encoded = btoa(unescape(encodeURIComponent(`${user}:${password}`)));
    const r = await fetch("/api/v2/access", { credentials: "same-origin",
      headers: { "X-Requested-With": "kiln", Authorization: "Basic " + encoded } });
    if (!r.ok) { msg.textContent = "wrong user name or password"; return; }
    sessionStorage.setItem(AUTH_KEY, encoded);
    await drawWho();
    route();
  } },
  h("input", { name: "user", placeholder: "user", autocomplete: "username", "aria-label": "user" }),
  h("input", { name: "password", type: "password", placeholder: "password", autocomplete: "current-password", "aria-label": "password" }),
  h("button", { type: "submit" }, "Sign in"));
  const msg = h("span", { class: "error" });
  form.append(msg);
  if (me.user) {
    who.replaceChildren(h("span", { class: "muted" }, me.user), " ",
      h("a", { href: "#", id: "signout", onclick: async (ev) => {
        ev.preventDefault(); sessionStorage.removeItem(AUTH_KEY); await drawWho(); route();
      } }, "Sign out"));
  } else {
    who.replaceChildren(h("a", { href: "#", id: "signin", onclick: (ev) => {
      ev.preventDefault(); form.hidden = !form.hidden;
      if (!form.hidden) form.querySelector("input").focus();
    } }, "Sign in"), form);
  }
}

// ---- Pushes, in the manner of TBPL and Treeherder ----------------------

const FAILED = new Set(["failure", "warnings", "exception"]);
const jobState = (j) => (j.state === "done" ? RESULTS[j.results] || "exception" : j.state);
const jobKey = (j) => (j.buildid ? `b${j.buildid}` : `r${j.buildrequestid}`);
const shortRev = (r) => (r || "").slice(0, 12);
const personOf = (a) => (a || "").replace(/\s*<.*>$/, "") || a;

/// The push page's state lives in the URL (`#/?branch=B&failures=1&filter=T&job=K&before=BSID`),
/// so that a link shows the same view.
function pushParams(path) {
  return new URLSearchParams(path.split("?")[1] || "");
}
function pushHref(params) {
  const s = params.toString();
  return "#/" + (s ? "?" + s : "");
}

async function pushesPage(params) {
  const show = viewOf();
  const view = { data: null, me: { user: null, may: [] }, workers: new Map(), failures: new Map() };
  const root = h("div", { class: "pushpage" });
  const branchList = h("nav", { class: "branches", "aria-label": "branches" });
  const list = h("div", { id: "pushes" });
  const nav = h("p", { class: "nav" });
  const panel = h("aside", { id: "panel", class: "panel", hidden: true });
  const setParam = (k, v) => {
    if (v === null || v === "" || v === false) params.delete(k); else params.set(k, v);
    history.replaceState(null, "", pushHref(params));
  };
  const failuresBox = h("input", { type: "checkbox", id: "failures", checked: params.get("failures") === "1",
    onchange: () => { setParam("failures", failuresBox.checked ? "1" : null); render(); } });
  const filterBox = h("input", { type: "search", id: "filter", placeholder: "filter builders", value: params.get("filter") || "",
    "aria-label": "filter builders", oninput: () => { setParam("filter", filterBox.value.trim()); render(); } });
  const heading = h("h1", {}, "Pushes");
  root.append(branchList, h("section", { class: "pushcol" }, heading,
    h("div", { class: "toolbar" }, h("label", {}, failuresBox, " failures only"), filterBox), list, nav), panel);
  show().replaceChildren(root);

  const fetchData = async () => {
    if (!params.has("branch")) {
      const first = await api("grid?buildsets=1");
      if (first.branches.length) setParam("branch", first.branches[0].branch ?? "");
    }
    const q = new URLSearchParams({ buildsets: "60" });
    if (params.has("branch")) q.set("branch", params.get("branch"));
    if (params.get("before")) q.set("before", params.get("before"));
    const [data, me, { workers }] = await Promise.all([api("grid?" + q), whoami(), api("workers")]);
    document.getElementById("title").textContent = data.title || "";
    view.data = data;
    view.me = me;
    view.workers = new Map(workers.map((w) => [w.workerid, w]));
  };

  const render = () => {
    const data = view.data;
    if (!data) return;
    const current = params.has("branch") ? params.get("branch") : null;
    branchList.replaceChildren(...data.branches.map((b) => {
      const p = new URLSearchParams(params);
      p.set("branch", b.branch ?? ""); p.delete("job"); p.delete("before");
      const mine = (b.branch ?? "") === current;
      return h("a", { href: pushHref(p), class: "branch" + (mine ? " current" : ""), dataset: { branch: b.branch ?? "", state: b.state },
        title: `newest push ${when(b.submitted_at)}: ${b.state}` },
        h("span", { class: `dot ${b.state}` }), b.branch ?? "(no branch)");
    }));
    heading.textContent = current === null ? "Pushes" : `Pushes to ${current || "(no branch)"}`;
    const builders = new Map(data.builders.map((b) => [b.builderid, b]));
    const failuresOnly = params.get("failures") === "1";
    const text = (params.get("filter") || "").toLowerCase();
    const shown = (j) => {
      const b = builders.get(j.builderid);
      if (failuresOnly && !FAILED.has(jobState(j))) return false;
      return !text || (b ? b.name : "").toLowerCase().includes(text);
    };
    if (!data.pushes.length) {
      list.replaceChildren(h("p", { class: "muted" }, "No pushes yet. Commit to a watched repository, or force a build from a builder's page."));
    } else {
      list.replaceChildren(...data.pushes.map((p) => renderPush(p, builders, shown, params, openJob)));
    }
    const oldest = Math.min(...data.pushes.flatMap((p) => p.buildsets));
    const older = new URLSearchParams(params); older.delete("job");
    if (Number.isFinite(oldest)) older.set("before", oldest);
    const newest = new URLSearchParams(params); newest.delete("before"); newest.delete("job");
    nav.replaceChildren(...[
      params.get("before") ? h("a", { href: pushHref(newest) }, "Newest pushes") : null, params.get("before") ? " · " : null,
      data.pushes.length && Number.isFinite(oldest) && oldest > 1 ? h("a", { href: pushHref(older), id: "older" }, "Older pushes") : null,
    ].filter((x) => x !== null));
    for (const el of list.querySelectorAll(".job.selected")) el.classList.remove("selected");
    const key = params.get("job");
    if (key) {
      const el = list.querySelector(`.job[data-key="${CSS.escape(key)}"]`);
      if (el) el.classList.add("selected");
    }
    drawPanel();
  };

  const findJob = (key) => {
    for (const p of view.data.pushes) for (const j of p.jobs) if (jobKey(j) === key) return [p, j];
    return [null, null];
  };

  function openJob(key) {
    setParam("job", key);
    render();
  }

  // What the last control did, for the job it was about (kept across the
  // live redraws of the panel).
  let notice = { key: null, text: "", error: false };
  const act = async (msg, path, method, params) => {
    const key = params_key();
    msg.textContent = `${method}…`;
    try {
      const r = await rpc(path, method, params);
      notice = { key, error: false,
        text: method === "rebuild" ? `rebuild requested (request ${Object.values(r[1]).join(", ")})` : `${method} sent` };
    } catch (e) { notice = { key, text: e.message, error: true }; }
    drawPanel();
  };
  const params_key = () => params.get("job");

  const drawPanel = () => {
    const key = params.get("job");
    const [push, j] = key ? findJob(key) : [null, null];
    if (!j) { panel.hidden = true; panel.replaceChildren(); return; }
    panel.hidden = false;
    const b = view.data.builders.find((x) => x.builderid === j.builderid) || { name: `builder ${j.builderid}` };
    const state = jobState(j);
    const worker = j.workerid ? view.workers.get(j.workerid) : null;
    const may = new Set(view.me.may || []);
    const mine = notice.key === key;
    const msg = h("span", { class: "msg" + (mine && notice.error ? " error" : "") }, mine ? notice.text : "");
    const buttons = [];
    if (j.buildid && j.state === "done") {
      buttons.push(may.has("rebuild") ? h("button", { id: "rebuild", onclick: () => act(msg, `builds/${j.buildid}`, "rebuild") }, "Rebuild")
        : h("span", { class: "muted" }, view.me.user ? "You may not rebuild." : "Sign in to rebuild."));
    }
    if (j.buildid && j.state === "running" && may.has("stop")) {
      buttons.push(h("button", { id: "stop", onclick: () => act(msg, `builds/${j.buildid}`, "stop", { reason: "stopped from the push page" }) }, "Stop"));
    }
    if (j.state === "pending" && may.has("cancel")) {
      buttons.push(h("button", { id: "cancel", onclick: () => act(msg, `buildrequests/${j.buildrequestid}`, "cancel", { reason: "cancelled from the push page" }) }, "Cancel"));
    }
    const close = new URLSearchParams(params); close.delete("job");
    const failure = h("div", { class: "failure" });
    panel.replaceChildren(
      h("div", { class: "panelhead" }, h("span", { class: `res ${state}` }, b.symbol || "?"), " ",
        h("a", { href: `#/builders/${j.builderid}` }, b.name),
        j.buildid ? [" ", h("a", { href: `#/builds/${j.buildid}` }, `#${j.number}`)] : null,
        h("a", { href: pushHref(close), class: "close", title: "close", "aria-label": "close",
          onclick: (ev) => { ev.preventDefault(); setParam("job", null); render(); } }, "×")),
      h("dl", {},
        h("dt", {}, "State"), h("dd", { id: "jobstate" }, state),
        h("dt", {}, "Push"), h("dd", {}, shortRev(push.revision) || push.reason),
        h("dt", {}, "Worker"), h("dd", {}, worker ? h("a", { href: `#/workers/${worker.workerid}` }, worker.name) : "—"),
        h("dt", {}, "Started"), h("dd", {}, j.started_at ? when(j.started_at) : "—"),
        h("dt", {}, j.complete_at ? "Took" : "Running for"), h("dd", {}, j.started_at ? duration(j.started_at, j.complete_at) : "—")),
      buttons.length ? h("div", { class: "actions" }, buttons, " ", msg) : msg,
      failure);
    if (j.buildid && j.state === "done" && state !== "success") drawFailure(j.buildid, failure);
  };

  const drawFailure = async (buildid, into) => {
    let f = view.failures.get(buildid);
    if (!f) {
      f = (await api(`builds/${buildid}/failure`).catch(() => ({ failure: null }))).failure;
      if (f) view.failures.set(buildid, f);
    }
    if (!f) return;
    if (f.deleted) {
      into.replaceChildren(
        h("h2", {}, `Step ${f.name}: ${RESULTS[f.results] || "exception"}`),
        h("p", { class: "muted deleted" }, "Its log was deleted by the janitor: the build ended longer ago than its logHorizon."));
      return;
    }
    const pre = h("pre", { class: "log faillines" }, f.lines.map((l) => h("span", { class: /error|fail|\*\*\*/i.test(l) ? "e" : "" }, l + "\n")));
    into.replaceChildren(
      h("h2", {}, `Step ${f.name}: ${RESULTS[f.results] || "exception"}`),
      h("p", { class: "muted" }, f.flagged ? "Lines the log rules flagged:" : `The last ${f.lines.length} lines of its output:`),
      pre,
      h("p", { class: "logs" }, "Logs: ", f.logs.map(([id, name]) => [h("a", { href: `#/builds/${buildid}/logs/${id}` }, name), " ",
        h("a", { href: `/api/v2/logs/${id}/raw`, class: "muted" }, "(raw)"), " "])));
    // The end of the output is where a build says why it stopped.
    pre.scrollTop = pre.scrollHeight;
  };

  await fetchData();
  render();
  const redraw = debounce(() => fetchData().then(render).catch(fail), 250);
  const es = follow("topics=changes,buildsets,buildrequests,builds", redraw);
  return { close() { es.close(); } };
}

/// One push: who pushed what when, then a row per platform with a symbol
/// per job; `shown(job)` says which jobs the filters keep.
function renderPush(p, builders, shown, params, openJob) {
  const newest = p.changes[0];
  const done = p.jobs.filter((j) => j.state === "done").length;
  const rows = new Map();
  for (const j of p.jobs) {
    if (!shown(j)) continue;
    const b = builders.get(j.builderid);
    const platform = b ? b.platform : `builder ${j.builderid}`;
    if (!rows.has(platform)) rows.set(platform, []);
    rows.get(platform).push(j);
  }
  const platforms = [...rows.keys()].sort();
  const selected = params.get("job");
  const link = (c) => safeUrl(c.revlink) ? h("a", { href: safeUrl(c.revlink), class: "rev" }, shortRev(c.revision)) : h("span", { class: "rev" }, shortRev(c.revision));
  return h("article", { class: "push", dataset: { revision: p.revision || "", branch: p.branch || "" } },
    h("div", { class: "pushhead" },
      h("b", { class: "pusher" }, newest ? personOf(newest.author) : p.reason), " ",
      h("span", { class: "muted" }, when(p.submitted_at)), " ",
      p.revision && !p.changes.length ? h("span", { class: "rev" }, shortRev(p.revision)) : null,
      h("span", { class: "count", title: "jobs done" }, `${done} of ${p.jobs.length} done`)),
    p.changes.length ? h("ul", { class: "csets" }, p.changes.map((c) => h("li", {},
      link(c), " ", h("span", { class: "author" }, personOf(c.author)), " ",
      h("span", { class: "comments" }, (c.comments || "").split("\n")[0])))) : null,
    platforms.length ? h("div", { class: "prows" }, platforms.map((pf) => h("div", { class: "prow", dataset: { platform: pf } },
      h("span", { class: "pf" }, pf),
      h("span", { class: "jobs" }, rows.get(pf).sort((a, b) => {
        const an = (builders.get(a.builderid) || {}).name || "", bn = (builders.get(b.builderid) || {}).name || "";
        return an.localeCompare(bn) || a.buildrequestid - b.buildrequestid || (a.buildid || 1e15) - (b.buildid || 1e15);
      }).map((j) => {
        const b = builders.get(j.builderid) || {};
        const state = jobState(j);
        return h("a", { href: "#", class: `job res ${state}` + (jobKey(j) === selected ? " selected" : ""),
          title: `${b.name || "?"}: ${state}`, dataset: { key: jobKey(j), builder: b.name || "", state, buildid: j.buildid || "" },
          onclick: (ev) => { ev.preventDefault(); openJob(jobKey(j)); } }, b.symbol || "?");
      }))))) : h("p", { class: "muted nojobs" }, p.jobs.length ? "No jobs match the filters." : "No jobs."));
}

// ---- Builders -----------------------------------------------------------

async function buildersPage() {
  const show = viewOf();
  const [{ builders }, grid] = await Promise.all([api("builders"), api("grid?buildsets=1")]);
  const cat = new Map(grid.builders.map((b) => [b.builderid, b.category || ""]));
  const rows = builders.filter((b) => cat.has(b.builderid))
    .map((b) => h("tr", {}, h("td", {}, h("a", { href: `#/builders/${b.builderid}` }, b.name)),
      h("td", { class: "muted" }, cat.get(b.builderid)), h("td", { class: "muted" }, b.description || "")));
  show().replaceChildren(h("h1", {}, "Builders"),
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Category"), h("th", {}, "Description"))), h("tbody", {}, rows))));
  return { close() {} };
}

async function builderPage(id) {
  const show = viewOf();
  const draw = async () => {
    const [{ builders }, { builds }, { buildrequests }, { forceschedulers }] = await Promise.all([
      api(`builders/${id}`), api(`builders/${id}/builds?order=-number&limit=50`),
      api(`buildrequests?builderid=${id}&complete=false&claimed=false`), api("forceschedulers")]);
    const b = builders[0];
    const force = forceschedulers.find((f) => f.builder_names.includes(b.name));
    const msg = h("span", { class: "muted" });
    show().replaceChildren(
      h("h1", {}, b.name),
      b.description ? h("p", {}, b.description) : null,
      force ? h("p", {}, h("button", {
        onclick: async () => {
          msg.textContent = "forcing…";
          try { await rpc(`forceschedulers/${encodeURIComponent(force.name)}`, "force", { builderNames: [b.name], reason: "forced from the web page" }); msg.textContent = "forced"; }
          catch (e) { msg.textContent = e.message; }
        },
      }, force.button_name || "Force build"), " ", msg) : null,
      h("h2", {}, `Waiting requests (${buildrequests.length})`),
      buildrequests.length ? h("ul", {}, buildrequests.map((r) => h("li", {},
        `request ${r.buildrequestid}, submitted ${when(r.submitted_at)} `,
        h("button", { onclick: async (ev) => {
          try { await rpc(`buildrequests/${r.buildrequestid}`, "cancel", { reason: "cancelled from the web page" }); }
          catch (e) { ev.target.replaceWith(h("span", { class: "error" }, e.message)); }
        } }, "Cancel")))) : h("p", { class: "muted" }, "none"),
      h("h2", {}, "Builds"),
      h("div", { class: "scroll" }, h("table", {}, h("tbody", {}, builds.map((x) => h("tr", {},
        h("td", {}, badge(x.results, x.complete, `#${x.number}`, `#/builds/${x.buildid}`)),
        h("td", {}, x.state_string), h("td", { class: "muted" }, when(x.started_at)),
        h("td", { class: "muted" }, duration(x.started_at, x.complete_at))))))));
  };
  await draw();
  const redraw = debounce(() => draw().catch(fail), 250);
  const es = follow("topics=buildrequests,builds", redraw);
  return { close() { es.close(); } };
}

// ---- A build, with its steps and a live log -----------------------------

async function buildPage(id, logid) {
  const show = viewOf();
  const view = { es: null, lines: null, log: null, steps: new Set() };
  const draw = async () => {
    const { builds } = await api(`builds/${id}`);
    const b = builds[0];
    const [{ builders }, { steps }] = await Promise.all([api(`builders/${b.builderid}`), api(`builds/${id}/steps`)]);
    const worker = b.workerid ? (await api(`workers/${b.workerid}`).catch(() => ({ workers: [] }))).workers[0] : null;
    const logs = await Promise.all(steps.map((s) => api(`steps/${s.stepid}/logs`).then((r) => r.logs)));
    view.steps = new Set(steps.map((s) => String(s.stepid)));
    const list = h("ul", { class: "steps" }, steps.map((s, i) => h("li", { dataset: { step: s.name } },
      badge(s.results, s.complete, s.number), " ", h("b", {}, s.name), " ",
      h("span", { class: "muted" }, s.state_string, " ", duration(s.started_at, s.complete_at)), " ",
      h("span", { class: "logs" }, logs[i].map((l) =>
        h("a", { href: `#/builds/${id}/logs/${l.logid}` }, l.name))))));
    const stop = b.complete ? null : h("button", { onclick: async (ev) => {
      try { await rpc(`builds/${id}`, "stop", { reason: "stopped from the web page" }); }
      catch (e) { ev.target.replaceWith(h("span", { class: "error" }, e.message)); }
    } }, "Stop");
    const builder = builders[0];
    show().replaceChildren(
      h("h1", {}, h("a", { href: `#/builders/${builder.builderid}` }, builder.name), ` #${b.number} `,
        badge(b.results, b.complete)),
      h("p", {}, b.state_string, " · started ", when(b.started_at), " · ", duration(b.started_at, b.complete_at),
        worker ? [" · on ", h("a", { href: `#/workers/${worker.workerid}` }, worker.name)] : null, " ", stop),
      list, view.log || h("p", { class: "muted" }, "Choose a log to read it; a running step's log follows as it grows."));
  };
  const openLog = async (lid) => {
    const [{ logs }, { logchunks }] = await Promise.all([api(`logs/${lid}`), api(`logs/${lid}/contents`)]);
    const log = logs[0];
    const pre = h("pre", { class: "log", id: "log", dataset: { logid: lid } });
    const add = (text) => {
      for (const line of text.split("\n")) {
        if (line === "" ) continue;
        if (log.type === "s") pre.append(h("span", { class: line[0] }, line.slice(1) + "\n"));
        else pre.append(line + "\n");
      }
    };
    for (const c of logchunks) add(c.content);
    if (log.type === "d") pre.append(h("span", { class: "muted" }, "This log was deleted by the janitor: its build ended longer ago than the JanitorConfigurator's logHorizon.\n"));
    view.lines = add;
    view.log = h("div", {}, h("h2", {}, log.name, " ", h("a", { href: `/api/v2/logs/${lid}/raw` }, "raw")), pre);
  };
  if (logid) await openLog(logid);
  await draw();
  const redraw = debounce(() => draw().catch(fail), 200);
  const es = follow(`topics=builds,steps,logs${logid ? "&logs=" + logid : ""}`, (topic, ev) => {
    if (topic === "logs" && ev.event === "append" && String(ev.id) === String(logid) && view.lines) {
      const pre = document.getElementById("log");
      const atEnd = pre && pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      view.lines(ev.data.lines.join("\n"));
      if (pre && atEnd) pre.scrollTop = pre.scrollHeight;
      return;
    }
    if (topic === "logs" && ev.event === "append") return;
    if (topic === "lagged") { redraw(); return; }
    const d = ev.data || {};
    if (String(d.buildid) === String(id) || (topic === "logs" && view.steps.has(String(d.stepid)))) redraw();
  });
  return { close() { es.close(); } };
}

// ---- Workers ------------------------------------------------------------

// A latent worker's state (stopped, starting, idle, building, stopping,
// failed); nothing for a worker that is always on.
function latentPill(w) {
  if (!w.latent) return null;
  const s = w.latent.state;
  const cls = s === "failed" ? "down" : s === "stopped" ? "" : "up";
  return h("span", { class: `pill latent ${cls}`, title: w.latent.reason || "latent worker" }, `latent: ${s}`);
}

async function workersPage() {
  const show = viewOf();
  const draw = async () => {
    const { workers } = await api("workers");
    show().replaceChildren(h("h1", {}, "Workers"),
      h("div", { class: "scroll" }, h("table", {}, h("tbody", {}, workers.map((w) => {
        const up = (w.connected_to || []).length > 0;
        return h("tr", { dataset: { worker: w.name } },
          h("td", {}, h("a", { href: `#/workers/${w.workerid}` }, w.name)),
          h("td", {}, h("span", { class: `pill ${up ? "up" : "down"}` }, up ? "connected" : "not connected")),
          h("td", {}, latentPill(w)),
          h("td", { class: "muted" }, (w.workerinfo && (w.workerinfo.os_info || w.workerinfo.version)) || ""));
      })))));
  };
  await draw();
  const es = follow("topics=workers", debounce(() => draw().catch(fail), 250));
  return { close() { es.close(); } };
}

async function workerPage(id) {
  const show = viewOf();
  const draw = async () => {
    const [{ workers }, { builds }, grid] = await Promise.all([
      api(`workers/${id}`), api(`builds?workerid=${id}&order=-buildid&limit=50`), api("grid?buildsets=1")]);
    const w = workers[0];
    const names = new Map(grid.builders.map((b) => [b.builderid, b.name]));
    const up = (w.connected_to || []).length > 0;
    const info = Object.entries(w.workerinfo || {}).filter(([, v]) => typeof v !== "object");
    show().replaceChildren(h("h1", {}, w.name, " ", h("span", { class: `pill ${up ? "up" : "down"}` }, up ? "connected" : "not connected"), " ", latentPill(w)),
      w.latent && w.latent.reason ? h("p", { class: "error" }, `last start failed: ${w.latent.reason}`) : null,
      info.length ? h("table", {}, h("tbody", {}, info.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, String(v)))))) : null,
      h("h2", {}, "Builds"),
      h("div", { class: "scroll" }, h("table", {}, h("tbody", {}, builds.map((x) => h("tr", {},
        h("td", {}, badge(x.results, x.complete, `#${x.number}`, `#/builds/${x.buildid}`)),
        h("td", {}, names.get(x.builderid) || `builder ${x.builderid}`),
        h("td", { class: "muted" }, when(x.started_at))))))));
  };
  await draw();
  const es = follow("topics=workers,builds", debounce(() => draw().catch(fail), 250));
  return { close() { es.close(); } };
}

// ---- The config in force ------------------------------------------------

async function configPage() {
  const show = viewOf();
  const draw = async () => {
    const [{ config, files }, { reloads }, { changesources }] = await Promise.all([api("config"), api("reloads?limit=10"), api("changesources")]);
    const pill = { ok: "up", failing: "down" };
    show().replaceChildren(h("h1", {}, "Config"),
      h("p", {}, `${config.builders.length} builders, ${config.schedulers.length} schedulers, ${config.workers.length} workers, ${config.change_source.length} change sources.`),
      ...(changesources.length ? [h("h2", {}, "Change sources"),
        h("div", { class: "scroll" }, h("table", { id: "changesources" }, h("tbody", {}, changesources.map((c) => h("tr", { dataset: { source: c.name, state: c.state } },
          h("td", {}, h("code", {}, c.name)),
          h("td", {}, h("span", { class: `pill ${pill[c.state] || ""}` }, c.state)),
          h("td", { class: c.state === "failing" ? "error" : "muted" },
            c.state === "failing" ? `${c.last_error} (since ${when(c.failing_since)}, ${c.failing_for} failed polls; next try ${when(c.retry_at)})` :
            c.last_ok ? `last poll ${when(c.last_ok)}` : "not polled by this master yet"))))))] : []),
      h("h2", {}, "Last reloads"),
      reloads.length ? h("ul", { id: "reloads" }, reloads.map((r) => h("li", {},
        h("span", { class: `pill ${r.applied ? "up" : "down"}` }, r.applied ? "applied" : "failed"), " ",
        when(r.started_at), ` · ${r.trigger} · ${r.duration_ms.toFixed(0)} ms`,
        r.applied ? h("pre", { class: "diff" }, r.diff || "nothing changed") : h("pre", { class: "error" }, r.errors)))) :
        h("p", { class: "muted" }, "No reload since the master started."),
      h("h2", {}, "Watched files"),
      h("ul", {}, (files || []).map((f) => h("li", {}, h("code", {}, f)))),
      h("h2", {}, "Config in force"),
      h("pre", { class: "json" }, JSON.stringify(config, null, 2)));
  };
  await draw();
  const es = follow("topics=reloads,changes", debounce(() => draw().catch(fail), 250));
  // A poll that fails stores nothing: look again now and then.
  const timer = setInterval(() => draw().catch(fail), 10000);
  return { close() { es.close(); clearInterval(timer); } };
}

// ---- Routing ------------------------------------------------------------

async function route() {
  generation += 1;
  page.close();
  page = { close() {} };
  const path = location.hash.replace(/^#/, "") || "/";
  const m = (re) => path.match(re);
  let r;
  try {
    if ((r = m(/^\/builds\/(\d+)(?:\/logs\/(\d+))?$/))) page = await buildPage(r[1], r[2]);
    else if ((r = m(/^\/builders\/(\d+)$/))) page = await builderPage(r[1]);
    else if (m(/^\/builders$/)) page = await buildersPage();
    else if ((r = m(/^\/workers\/(\d+)$/))) page = await workerPage(r[1]);
    else if (m(/^\/workers$/)) page = await workersPage();
    else if (m(/^\/config$/)) page = await configPage();
    else if ((r = m(/^\/pushes\/before\/(\d+)$/))) page = await pushesPage(new URLSearchParams({ before: r[1] }));
    else page = await pushesPage(pushParams(path));
  } catch (e) {
    fail(e);
  }
}

window.addEventListener("hashchange", route);
drawWho();
route();
