// kiln's web page: the push grid, builders, builds with live logs, workers
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
  for (const c of children.flat()) {
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
    headers: { "Content-Type": "application/json" },
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

// ---- The push grid ------------------------------------------------------

/// The grid from the newest pushes, or (`before`, a buildset id) from
/// older ones: `#/pushes/before/ID` pages back.
async function gridPage(before) {
  const show = viewOf();
  let data;
  const draw = async () => {
    data = await api("grid?buildsets=60" + (before ? `&before=${before}` : ""));
    document.getElementById("title").textContent = data.title || "";
    const oldest = Math.min(...data.pushes.flatMap((p) => p.buildsets));
    const nav = h("p", {},
      before ? h("a", { href: "#/" }, "Newest pushes") : null, before ? " · " : null,
      data.pushes.length && Number.isFinite(oldest) && oldest > 1 ?
        h("a", { href: `#/pushes/before/${oldest}`, id: "older" }, "Older pushes") : null);
    show().replaceChildren(renderGrid(data), nav);
  };
  await draw();
  const redraw = debounce(() => draw().catch(fail), 250);
  const es = follow("topics=changes,buildsets,buildrequests,builds", redraw);
  return { close() { es.close(); } };
}

function renderGrid(data) {
  const builders = data.builders;
  if (!data.pushes.length) {
    return h("div", {}, h("h1", {}, "Pushes"),
      h("p", { class: "muted" }, "No pushes yet. Commit to a watched repository, or force a build from a builder's page."));
  }
  // Only the builders some push on this page asked for, grouped by category.
  const used = new Set(data.pushes.flatMap((p) => p.cells.map((c) => c.builderid)));
  const cols = builders.filter((b) => used.has(b.builderid));
  const groups = [];
  for (const b of cols) {
    const g = b.category || "";
    if (!groups.length || groups[groups.length - 1].name !== g) groups.push({ name: g, n: 0 });
    groups[groups.length - 1].n++;
  }
  const firstOf = new Set();
  let prev = null;
  for (const b of cols) { if ((b.category || "") !== prev) firstOf.add(b.builderid); prev = b.category || ""; }
  const short = (b) => (b.category && b.name.includes(b.category)) ?
    b.name.replace(b.category, "").replace(/\s+/g, " ").trim() || b.name : b.name;
  const head1 = h("tr", {}, h("th", { class: "push" }, ""),
    groups.map((g) => h("th", { class: "group", colspan: g.n }, g.name)));
  const head2 = h("tr", {}, h("th", { class: "push" }, "Push"),
    cols.map((b) => h("th", { class: "builder", title: b.name },
      h("a", { href: `#/builders/${b.builderid}` }, short(b)))));
  const rows = data.pushes.map((p) => {
    const cells = new Map(p.cells.map((c) => [c.builderid, c]));
    const info = h("td", { class: "push" },
      h("div", { class: "muted" }, when(p.submitted_at), p.branch ? ` · ${p.branch}` : ""),
      p.changes.length ? p.changes.slice(0, 5).map((c) => h("div", { class: "change" },
        h("span", { class: "rev" }, safeUrl(c.revlink) ? h("a", { href: safeUrl(c.revlink) }, (c.revision || "").slice(0, 12)) : (c.revision || "").slice(0, 12)),
        " ", h("b", {}, c.author.replace(/\s*<.*>$/, "")), " ",
        h("span", { class: "comments" }, c.comments.split("\n")[0]))) : h("div", { class: "comments" }, p.reason),
      p.changes.length > 5 ? h("div", { class: "muted" }, `and ${p.changes.length - 5} more`) : null);
    return h("tr", { dataset: { revision: p.revision || "", branch: p.branch || "" } }, info,
      cols.map((b) => {
        const c = cells.get(b.builderid);
        const td = h("td", { class: "cell" + (firstOf.has(b.builderid) ? " first" : ""), dataset: { builder: b.name } });
        if (!c) return td;
        td.dataset.state = c.state;
        if (c.results !== null && c.results !== undefined) td.dataset.results = c.results;
        if (c.state === "pending") td.append(h("span", { class: "res pending", title: "waiting for a worker" }, "…"));
        else td.append(badge(c.state === "done" ? c.results : null, c.state === "done",
          c.number ?? "", c.buildid ? `#/builds/${c.buildid}` : null));
        return td;
      }));
  });
  return h("div", {}, h("h1", {}, "Pushes"),
    h("div", { class: "scroll" }, h("table", { class: "grid" }, h("thead", {}, head1, head2), h("tbody", {}, rows))));
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
    const [{ config, files }, { reloads }] = await Promise.all([api("config"), api("reloads?limit=10")]);
    show().replaceChildren(h("h1", {}, "Config"),
      h("p", {}, `${config.builders.length} builders, ${config.schedulers.length} schedulers, ${config.workers.length} workers, ${config.change_source.length} change sources.`),
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
  const es = follow("topics=reloads", debounce(() => draw().catch(fail), 250));
  return { close() { es.close(); } };
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
    else if ((r = m(/^\/pushes\/before\/(\d+)$/))) page = await gridPage(r[1]);
    else page = await gridPage();
  } catch (e) {
    fail(e);
  }
}

window.addEventListener("hashchange", route);
route();
