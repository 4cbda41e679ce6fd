// Conveyor dashboard: a client of the REST API like any other. The credential stays in this
// tab (sessionStorage). Every value from the API is put in the page as text, never as HTML.
"use strict";

const store = window.sessionStorage;
let stream = null;        // the live-events reader of the current page, cancelled on navigation
let onStats = null;       // what the current page does with each live `stats` event (a page's build returns it)
let routeGeneration = 0;  // which route() call is the latest: only it may show its page
let flash = "";           // the result of the last action, shown once on the next page drawn

function takeFlash() { const f = flash; flash = ""; return f; }

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") el.addEventListener("click", v);
    else if (v !== undefined && v !== null) el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + store.getItem("credential") };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) { signOut(data.detail || "signed out"); throw new Error(data.detail); }
  if (!r.ok) throw new Error((data.title || r.status) + ": " + (data.detail || "") + (data.request_id ? " (request " + data.request_id + ")" : ""));
  return data;
}

function signOut(message) {
  store.removeItem("credential");
  if (stream) { stream.cancel(); stream = null; }
  document.getElementById("nav").hidden = true;
  routeGeneration++;  // a page still loading is not shown after signing out
  document.getElementById("view").replaceChildren();
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message || "";
}

// Server-sent events over fetch, so the credential goes in a header (EventSource cannot send one).
async function listen() {
  if (stream) { stream.cancel(); stream = null; }
  const open = () => fetch("/v1/events", { headers: { "Authorization": "Bearer " + store.getItem("credential") } });
  let r = await open();
  // A key holds a few streams at most (429 past them), and one closed moments ago (a reload)
  // counts until the server's next write to it: wait as told and try again, a few times.
  for (let tries = 0; r.status === 429 && tries < 5; tries++) {
    await new Promise(done => setTimeout(done, 1000 * (Number(r.headers.get("Retry-After")) || 2)));
    r = await open();
  }
  if (!r.ok || !r.body) return;
  const reader = r.body.getReader();
  stream = reader;
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read().catch(() => ({ done: true }));
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
      if (data && onStats) { try { onStats(JSON.parse(data)); } catch (e) { console.error(e); } }
    }
  }
}

function stateCell(state) { return h("span", { class: "state state-" + state }, state); }
function when(t) { return t ? new Date(t).toLocaleString() : "–"; }
function table(columns, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "Nothing here.");
  return h("table", {}, h("thead", {}, h("tr", {}, columns.map(c => h("th", {}, c)))),
    h("tbody", {}, rows.map(r => h("tr", {}, r.map(c => h("td", {}, c))))));
}
function link(href, text) { return h("a", { href }, text); }
function errorBox(e) { return h("p", { class: "error", role: "alert" }, String(e.message || e)); }

const pages = {
  async overview(view) {
    const cards = h("div", { class: "cards", id: "state-cards" });
    const chart = svg("svg", { class: "chart", id: "throughput", viewBox: "0 0 600 180", preserveAspectRatio: "none", role: "img", "aria-label": "runs finished per minute" });
    const queues = h("div", { id: "queues" });
    const updated = h("p", { class: "muted", id: "updated" });
    view.append(h("h2", {}, "Overview"), h("h3", {}, "Runs by state (last 24 h)"), cards,
      h("h3", {}, "Throughput: runs finished per minute (last 30 min)"), chart, h("h3", {}, "Queues"), queues, updated);
    const draw = (o) => {
      const states = ["scheduled", "queued", "dispatched", "running", "succeeded", "failed", "timed_out", "dead", "cancelled", "lost", "expired"];
      cards.replaceChildren(...states.map(s => h("div", { class: "card", "data-state": s },
        h("div", { class: "n" }, String(o.runs_by_state[s] || 0)), h("div", { class: "l" }, s))));
      chart.replaceChildren();
      const points = o.throughput || [];
      const max = Math.max(1, ...points.map(p => p.succeeded + p.failed));
      const w = 600 / 30;
      const now = new Date(o.at).getTime();
      for (const p of points) {
        const slot = 29 - Math.floor((now - new Date(p.minute).getTime()) / 60000);
        if (slot < 0 || slot > 29) continue;
        const hs = 170 * p.succeeded / max, hf = 170 * p.failed / max;
        const ok = svg("rect", { class: "ok", x: slot * w + 2, y: 175 - hs, width: w - 4, height: hs });
        ok.append(svg("title", {})); ok.firstChild.textContent = p.minute + ": " + p.succeeded + " succeeded";
        chart.append(ok, svg("rect", { class: "bad", x: slot * w + 2, y: 175 - hs - hf, width: w - 4, height: hf }));
      }
      chart.setAttribute("data-total", String(points.reduce((a, p) => a + p.succeeded + p.failed, 0)));
      updated.textContent = "Updated " + when(o.at) + " · " + o.workers + " active workers";
    };
    const drawQueues = async () => {
      const q = await api("GET", "/v1/queues");
      queues.replaceChildren(table(["Queue", "State", "Tasks", "Waiting", "Backlog", "Running", "Done last minute", "Broker ready", "Isolated", "Consumers"],
        q.queues.map(x => [x.name, x.paused ? "paused" : "active", x.tasks, x.waiting, x.backlog, x.running, x.finished_last_minute,
                           x.broker ? x.broker.ready : "–", x.broker ? x.broker.isolated : "–", x.broker ? x.broker.consumers : "–"]),
        "No queues yet."));
    };
    draw(await api("GET", "/v1/overview"));
    await drawQueues();
    return (o) => { draw(o); drawQueues().catch(() => {}); };
  },

  async tasks(view) {
    const filter = h("input", { id: "prefix", placeholder: "name starts with…", "aria-label": "filter by name" });
    const list = h("div", { id: "task-list" });
    const load = async () => {
      const q = filter.value ? "&prefix=" + encodeURIComponent(filter.value) : "";
      const data = await api("GET", "/v1/tasks?limit=100" + q);
      list.replaceChildren(table(["Name", "Executor", "Schedule", "Queue", "Paused", "Last run", "Next run"],
        data.tasks.map(t => [link("#/tasks/" + encodeURIComponent(t.name), t.name), t.executor, t.schedule, t.queue, t.paused ? "yes" : "no",
          t.last_run ? stateCell(t.last_run.state) : "–", when(t.next_run_at)]), "No tasks yet."));
    };
    filter.addEventListener("input", () => load().catch(e => list.replaceChildren(errorBox(e))));
    view.append(h("h2", {}, "Tasks"), filter, list);
    await load();
  },

  async task(view, name) {
    const t = await api("GET", "/v1/tasks/" + encodeURIComponent(name));
    const message = h("p", { id: "action-result", role: "status" }, takeFlash());
    const act = (what) => async () => {
      try { await api("POST", "/v1/tasks/" + encodeURIComponent(name) + "/" + what); flash = what + ": done"; route(); }
      catch (e) { message.textContent = String(e.message); }
    };
    view.append(h("h2", {}, "Task ", t.name),
      h("div", {}, h("button", { type: "button", onclick: act("trigger") }, "Trigger now"), " ",
        h("button", { type: "button", onclick: act(t.paused ? "resume" : "pause") }, t.paused ? "Resume" : "Pause")), message,
      h("dl", {}, ...[["Executor", t.executor], ["Schedule", t.schedule + " (" + t.timezone + ")"], ["Queue", t.queue], ["Priority", t.priority],
        ["Timeout", t.timeout + " s"], ["Max attempts", t.max_attempts], ["Paused", t.paused ? "yes" : "no"], ["Next run", when(t.next_run_at)],
        ["Group", t.group || "–"], ["Parameters", JSON.stringify(t.parameters)]].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])),
      h("h3", {}, "Run history"),
      table(["Run", "Occurrence", "Attempt", "State", "Worker", "Trace id"], (t.recent_runs || []).map(r =>
        [link("#/run/" + r.id, r.id.slice(0, 8)), when(r.occurrence), r.attempt, stateCell(r.state), r.worker_id || "–", r.trace_id || "–"]), "No runs yet."));
  },

  async run(view, id) {
    const r = await api("GET", "/v1/runs/" + encodeURIComponent(id));
    view.append(h("h2", {}, "Run ", r.id),
      h("dl", {}, ...[["State", stateCell(r.state)], ["Attempt", r.attempt], ["Occurrence", when(r.occurrence)], ["Started", when(r.started_at)],
        ["Finished", when(r.finished_at)], ["Worker", r.worker_id || "–"], ["Exit code", r.exit_code ?? "–"], ["Trace id", r.trace_url ? h("a", { id: "trace-id", href: r.trace_url, target: "_blank", rel: "noopener noreferrer" }, r.trace_id)
                                   : h("code", { id: "trace-id" }, r.trace_id || "–")],
        ["Error", r.error_message ? (r.error_class || "") + ": " + r.error_message : "–"], ["Reason", r.reason || "–"]]
        .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("h3", {}, "Attempts of this occurrence"),
      table(["Run", "Attempt", "State", "Finished", "Error"], (r.attempts || []).map(a =>
        [a.id === r.id ? a.id.slice(0, 8) + " (this)" : link("#/run/" + a.id, a.id.slice(0, 8)), a.attempt, stateCell(a.state), when(a.finished_at), a.error_message || "–"])),
      h("h3", {}, "Result"), h("pre", { id: "result" }, r.result === undefined ? "(no result)" : JSON.stringify(r.result, null, 2)),
      h("h3", {}, "Output"), h("pre", { id: "output" }, r.output || "(no output)"));
  },

  async runs(view) {
    const list = h("div", { id: "live-runs" });
    view.append(h("h2", {}, "Live runs"), h("p", { class: "muted" }, "Runs queued, dispatched or running, refreshed as events arrive."), list);
    const load = async () => {
      const parts = await Promise.all(["running", "dispatched", "queued"].map(s => api("GET", "/v1/runs?limit=100&state=" + s)));
      const runs = parts.flatMap(p => p.runs);
      list.replaceChildren(table(["Run", "Task", "State", "Attempt", "Worker", "Started"], runs.map(r =>
        [link("#/run/" + r.id, r.id.slice(0, 8)), r.task_id.slice(0, 8), stateCell(r.state), r.attempt, r.worker_id || "–", when(r.started_at)]), "Nothing running now."));
    };
    await load();
    return () => { load().catch(() => {}); };
  },

  async workers(view) {
    const data = await api("GET", "/v1/workers");
    view.append(h("h2", {}, "Workers"), table(["Worker", "Host", "State", "In flight", "Concurrency", "Queues", "Executors", "Last heartbeat"],
      data.workers.map(w => [w.id, w.host, w.state, w.in_flight, w.concurrency, w.queues.join(", "), w.executors.join(", "), Math.round(w.seconds_since_heartbeat) + " s ago"]),
      "No worker has sent a heartbeat."));
  },

  async dead(view) {
    const data = await api("GET", "/v1/runs?limit=100&state=dead");
    const message = h("p", { id: "action-result", role: "status" }, takeFlash());
    view.append(h("h2", {}, "Dead letters"), h("p", { class: "muted" }, "Runs that ended dead: out of attempts, or dead-lettered by the broker."), message,
      table(["Run", "Task", "Attempt", "Reason", ""], data.runs.map(r => [link("#/run/" + r.id, r.id.slice(0, 8)), r.task_id.slice(0, 8), r.attempt,
        r.reason || r.error_message || "–", h("button", { type: "button", "data-run": r.id, onclick: async () => {
          try { const n = await api("POST", "/v1/runs/" + r.id + "/redrive"); flash = "Re-driven as attempt " + n.attempt; route(); }
          catch (e) { message.textContent = String(e.message); }
        } }, "Re-drive")]), "No dead runs."));
  },
};

async function route() {
  if (!store.getItem("credential")) { signOut(); return; }
  document.getElementById("signin").hidden = true;
  document.getElementById("nav").hidden = false;
  const [page, arg] = (location.hash.replace(/^#\//, "") || "overview").split("/");
  const name = page === "tasks" && arg ? "task" : page;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === "#/" + page);
  // A page is built aside and shown only if no later route (a hash change while it loaded, or
  // the sign-in's own route) has begun meanwhile: two builds into one view interleaved, and the
  // page showed the headings of one and the data of neither.
  const current = ++routeGeneration;
  const view = document.getElementById("view");
  const built = document.createElement("div");
  onStats = null;
  try {
    const handler = await (pages[name] || pages.overview)(built, arg && decodeURIComponent(arg));
    if (current !== routeGeneration) return;
    view.replaceChildren(...built.childNodes);
    onStats = handler || null;
    view.setAttribute("data-loaded", name);
  } catch (e) {
    if (current !== routeGeneration) return;
    view.replaceChildren(errorBox(e));
    view.setAttribute("data-loaded", "error");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    store.setItem("credential", document.getElementById("credential").value.trim());
    document.getElementById("credential").value = "";
    try { await api("GET", "/v1/overview"); } catch (err) { signOut(String(err.message)); return; }
    route();
    listen();
  });
  document.getElementById("signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
  if (store.getItem("credential")) listen();
});
