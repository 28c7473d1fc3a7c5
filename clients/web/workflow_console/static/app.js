// The console's one page (docs/console.md). Everything a run holds is shown as text
// (textContent, attributes), never parsed as HTML.
"use strict";

const main = document.getElementById("main");
let leaving = []; // what the current view must close when another one is drawn

// ---- the JSON API ------------------------------------------------------------------

function cookie(name) {
  const found = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    headers["X-CSRF-Token"] = cookie("wf_csrf");
  }
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const parsed = text ? JSON.parse(text) : {};
  if (response.status === 401 && location.pathname !== "/sign-in") {
    navigate("/sign-in"); // the engine wants a credential this browser has not given
  }
  if (!response.ok) {
    throw new ApiError(response.status, parsed);
  }
  return parsed;
}

// ---- small DOM helpers ---------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function showError(where, error) {
  where.replaceChildren(el("p", { class: "error", role: "alert", text: error.message }));
}

function notice(text, isError = false) {
  const box = document.getElementById("notice") || el("p", { id: "notice" });
  box.className = isError ? "error" : "ok";
  box.textContent = text;
  main.prepend(box);
}

// ---- routing -------------------------------------------------------------------------

function navigate(path) {
  if (location.pathname + location.search !== path) history.pushState({}, "", path);
  route();
}

function route() {
  for (const close of leaving) close();
  leaving = [];
  main.replaceChildren();
  const path = location.pathname;
  let match;
  if ((match = path.match(/^\/runs\/([^/]+)$/))) runPage(decodeURIComponent(match[1]));
  else if ((match = path.match(/^\/workflows\/([^/]+)$/)))
    workflowPage(decodeURIComponent(match[1]));
  else if (path === "/sign-in") signInPage();
  else runsPage();
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[href^='/']");
  if (link && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    navigate(link.getAttribute("href"));
  }
});
window.addEventListener("popstate", route);
document.getElementById("open-workflow").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = new FormData(event.target).get("workflow_id").trim();
  if (id) navigate(`/workflows/${encodeURIComponent(id)}`);
});

// ---- signing in ----------------------------------------------------------------------

function signInPage() {
  const error = el("p", { class: "error", role: "alert" });
  const form = el(
    "form",
    { id: "sign-in" },
    el("label", { for: "token", text: "Token" }),
    el("input", { id: "token", name: "token", type: "password", autocomplete: "off" }),
    el("button", { type: "submit", text: "Sign in" }),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("/api/session", { method: "POST", body: { token: form.token.value } });
      navigate("/runs");
    } catch (e) {
      error.textContent = e.message;
    }
  });
  main.append(el("h1", { text: "Sign in" }), form);
}

// ---- runs ------------------------------------------------------------------------------

const STATUSES = ["PENDING", "RUNNING", "PAUSING", "PAUSED", "WAITING", "COMPLETED", "FAILED", "CANCELLED"];

function runsPage() {
  const query = new URLSearchParams(location.search);
  const status = el("select", { name: "status", "aria-label": "status" }, el("option", { value: "", text: "any status" }));
  for (const s of STATUSES) status.append(el("option", { value: s, text: s.toLowerCase() }));
  status.value = query.get("status") || "";
  const workflow = el("input", { name: "workflow_id", placeholder: "workflow", value: query.get("workflow_id") || "" });
  const filters = el("form", { id: "filters" }, status, workflow, el("button", { type: "submit", text: "Filter" }));
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (workflow.value.trim()) q.set("workflow_id", workflow.value.trim());
    navigate(`/runs${q.toString() ? "?" + q : ""}`);
  });
  const body = el("tbody");
  const table = el(
    "table",
    { id: "runs" },
    el("thead", {}, el("tr", {}, ...["Run", "Workflow", "Status", "Progress", "Updated"].map((h) => el("th", { text: h })))),
    body,
  );
  const more = el("button", { id: "more", hidden: "", text: "Older runs" });
  let nextToken = "";
  more.addEventListener("click", async () => {
    const q = new URLSearchParams(query);
    q.set("page_token", nextToken);
    const page = await api(`/api/runs?${q}`);
    for (const run of page.runs) body.append(runRow(run));
    nextToken = page.next_page_token;
    more.hidden = !nextToken;
  });
  main.append(el("h1", { text: "Runs" }), filters, table, more);

  const live = new EventSource(`/api/runs/live?${query}`);
  leaving.push(() => live.close());
  live.addEventListener("runs", (message) => {
    const page = JSON.parse(message.data);
    if (page.error) {
      if (page.error === "UNAUTHENTICATED") navigate("/sign-in");
      else notice(page.message, true);
      return;
    }
    // The first page drawn again where it was; older pages (loaded by hand) stay below.
    const ids = new Set(page.runs.map((run) => run.run_id));
    for (const row of [...body.children]) {
      if (row.dataset.firstPage || ids.has(row.dataset.runId)) row.remove();
    }
    const fresh = page.runs.map(runRow);
    for (const row of fresh) row.dataset.firstPage = "1";
    body.prepend(...fresh);
    table.dataset.loaded = "1";
    if (!nextToken) {
      nextToken = page.next_page_token;
      more.hidden = !nextToken;
    }
  });
}

function runRow(run) {
  return el(
    "tr",
    { "data-run-id": run.run_id, "data-status": run.status },
    el("td", {}, el("a", { href: `/runs/${encodeURIComponent(run.run_id)}`, text: run.run_id })),
    el("td", {}, el("a", { href: `/workflows/${encodeURIComponent(run.workflow_id)}`, text: `${run.workflow_id} v${run.version}` })),
    el("td", {}, el("span", { class: `status ${run.status.toLowerCase()}`, text: run.status.toLowerCase() })),
    el("td", { text: `${run.completed_nodes}/${run.total_nodes} (${Math.round(run.progress_percent)}%)` }),
    el("td", { text: when(run.updated_at) }),
  );
}

// ---- a run -----------------------------------------------------------------------------

const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

async function runPage(runId) {
  let view;
  try {
    view = await api(`/api/runs/${encodeURIComponent(runId)}`);
  } catch (e) {
    showError(main, e);
    return;
  }
  const page = new RunView(view.run, view.definition);
  main.append(page.root);
  page.follow();
  leaving.push(() => page.close());
}

class RunView {
  constructor(run, definition) {
    this.run = run;
    this.definition = definition;
    this.nodes = new Map(
      definition.nodes.map((n) => [n.id, { spec: n, state: "pending", attempts: 0, started: null, ended: null, duration: null }]),
    );
    for (const id of run.completed_node_ids) {
      const node = this.nodes.get(id);
      if (node) node.state = "completed";
    }
    this.lastSeq = 0;
    this.received = 0;
    this.build();
    this.draw();
  }

  build() {
    const run = this.run;
    this.status = el("span", { id: "run-status", class: "status" });
    this.buttons = {};
    const bar = el("div", { class: "actions" });
    for (const [action, label] of [["pause", "Pause"], ["resume", "Resume"], ["cancel", "Cancel"], ["checkpoint", "Checkpoint"]]) {
      const button = el("button", { id: `${action}-run`, text: label, onclick: () => this.act(action) });
      this.buttons[action] = button;
      bar.append(button);
    }
    this.progress = el("div", { id: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" }, el("div", { class: "fill" }));
    this.progressText = el("span", { id: "progress-text" });
    this.approval = el("form", { id: "approval", hidden: "" });
    this.dag = svg("svg", { id: "dag" });
    this.output = el("pre", { id: "node-output" });
    this.outputTitle = el("h3", { id: "node-output-title", text: "Click a node to see its output" });
    this.timeline = el("div", { id: "timeline" });
    this.events = el("ol", { id: "events" });
    this.checkpoints = el("table", { id: "checkpoints" });
    this.error = el("p", { id: "run-error", class: "error" });
    this.root = el(
      "section",
      { id: "run", "data-run-id": run.run_id },
      el("h1", {}, el("span", { text: `Run ${run.run_id} ` }), this.status),
      el("p", {}, el("a", { href: `/workflows/${encodeURIComponent(run.workflow_id)}`, text: `${run.workflow_id} v${run.version}` })),
      bar,
      el("div", { class: "progress-line" }, this.progress, this.progressText),
      this.error,
      this.approval,
      el("div", { class: "graph" }, this.dag, el("div", { class: "output" }, this.outputTitle, this.output)),
      el("h2", { text: "Timeline" }),
      this.timeline,
      el("h2", { text: "Checkpoints" }),
      this.checkpoints,
      el("h2", { text: "Events" }),
      this.events,
    );
    this.layout();
    this.showStatus();
    this.loadCheckpoints();
  }

  // The DAG, laid out once by dagre; only the nodes' states change after.
  layout() {
    const g = new dagre.graphlib.Graph();
    g.setGraph({ rankdir: "LR", nodesep: 18, ranksep: 48, marginx: 8, marginy: 8 });
    g.setDefaultEdgeLabel(() => ({}));
    for (const node of this.definition.nodes) g.setNode(node.id, { width: 150, height: 44 });
    for (const node of this.definition.nodes)
      for (const dep of node.depends_on || []) if (this.nodes.has(dep)) g.setEdge(dep, node.id);
    dagre.layout(g);
    const { width, height } = g.graph();
    this.dag.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.dag.setAttribute("width", width);
    this.dag.setAttribute("height", height);
    for (const e of g.edges()) {
      const points = g.edge(e).points.map((p) => `${p.x},${p.y}`).join(" ");
      this.dag.append(svg("polyline", { class: "edge", points }));
    }
    for (const id of g.nodes()) {
      const box = g.node(id);
      const group = svg("g", { class: "node", "data-node-id": id, tabindex: 0, transform: `translate(${box.x - box.width / 2},${box.y - box.height / 2})` });
      group.append(svg("rect", { width: box.width, height: box.height, rx: 6 }));
      const label = svg("text", { x: 8, y: 18 });
      label.textContent = id.length > 20 ? id.slice(0, 19) + "…" : id;
      const detail = svg("text", { x: 8, y: 35, class: "detail" });
      group.append(label, detail);
      const title = svg("title");
      title.textContent = id;
      group.append(title);
      group.addEventListener("click", () => this.showOutput(id));
      this.nodes.get(id).group = group;
      this.nodes.get(id).detail = detail;
      this.dag.append(group);
    }
  }

  draw() {
    for (const [id, node] of this.nodes) {
      if (!node.group) continue;
      let state = node.state;
      node.group.setAttribute("data-state", state);
      node.group.setAttribute("class", `node ${state}`);
      const parts = [state];
      if (node.duration !== null) parts.push(duration(node.duration));
      if (node.attempts > 1) parts.push(`${node.attempts} attempts`);
      node.detail.textContent = parts.join(" · ");
    }
    this.drawTimeline();
  }

  showStatus() {
    const run = this.run;
    this.status.textContent = run.status.toLowerCase();
    this.status.className = `status ${run.status.toLowerCase()}`;
    this.status.dataset.status = run.status;
    const percent = Math.max(0, Math.min(100, run.progress_percent || 0));
    this.progress.dataset.percent = String(Math.round(percent));
    this.progress.setAttribute("aria-valuenow", String(Math.round(percent)));
    this.progress.firstChild.style.width = `${percent}%`;
    const eta = run.eta_seconds && !TERMINAL.has(run.status) ? `, about ${duration(run.eta_seconds)} left` : "";
    this.progressText.textContent = `${Math.round(percent)}% (${run.completed_nodes}/${run.total_nodes} nodes)${eta}`;
    const terminal = TERMINAL.has(run.status);
    this.buttons.pause.disabled = terminal || run.status === "PAUSED" || run.status === "PAUSING";
    this.buttons.resume.disabled = run.status !== "PAUSED";
    this.buttons.cancel.disabled = terminal;
    this.buttons.checkpoint.disabled = terminal;
    this.error.textContent = run.error || "";
    this.showApproval();
  }

  showApproval() {
    const run = this.run;
    if (run.status !== "WAITING") {
      this.approval.hidden = true;
      return;
    }
    if (!this.approval.hidden && this.approval.dataset.prompt === run.waiting_for) return;
    this.approval.dataset.prompt = run.waiting_for;
    const value = el("textarea", { id: "approval-value", rows: 3, "aria-label": "answer (JSON)" });
    value.value = "true";
    const error = el("p", { class: "error" });
    this.approval.replaceChildren(
      el("h2", { text: "Waiting for an answer" }),
      el("p", { id: "approval-prompt", text: run.waiting_for }),
      el("label", { for: "approval-value", text: "Answer (JSON)" }),
      value,
      el("button", { id: "approve", type: "submit", text: "Answer" }),
      error,
    );
    this.approval.onsubmit = async (event) => {
      event.preventDefault();
      let answer;
      try {
        answer = JSON.parse(value.value);
      } catch (e) {
        error.textContent = `not JSON: ${e.message}`;
        return;
      }
      try {
        await api(`/api/runs/${encodeURIComponent(run.run_id)}/resume`, { method: "POST", body: { value: answer } });
        this.approval.hidden = true;
      } catch (e) {
        error.textContent = e.message;
      }
    };
    this.approval.hidden = false;
  }

  async act(action) {
    const id = encodeURIComponent(this.run.run_id);
    const body = {};
    if (action === "cancel") body.reason = "cancelled from the console";
    if (action === "checkpoint") body.name = `console ${new Date().toISOString()}`;
    try {
      const done = await api(`/api/runs/${id}/${action}`, { method: "POST", body });
      if (done.run) this.update(done.run);
      if (action === "checkpoint") {
        notice(`checkpoint ${done.checkpoint_id} saved`);
        this.loadCheckpoints();
      }
    } catch (e) {
      notice(e.message, true);
    }
  }

  update(run) {
    this.run = { ...this.run, ...run };
    this.showStatus();
    this.draw();
  }

  async showOutput(id) {
    this.outputTitle.textContent = `Output of ${id}`;
    const state = this.run.state || {};
    this.output.textContent = id in state ? JSON.stringify(state[id], null, 2) : "(no output yet)";
    this.output.dataset.nodeId = id;
  }

  // ---- the live feed: EventSource resumes by Last-Event-ID itself --------------------

  follow() {
    const id = encodeURIComponent(this.run.run_id);
    this.source = new EventSource(`/api/runs/${id}/events`);
    this.source.onmessage = (message) => this.apply(JSON.parse(message.data));
    this.source.addEventListener("end", () => {
      this.source.close();
      this.root.dataset.feed = "ended";
      this.refresh();
    });
    this.source.addEventListener("failure", (message) => {
      this.source.close();
      notice(JSON.parse(message.data).message, true);
    });
    this.source.onopen = () => (this.root.dataset.feed = "open");
    this.source.onerror = () => (this.root.dataset.feed = "reconnecting");
  }

  close() {
    if (this.source) this.source.close();
  }

  apply(event) {
    this.received += 1;
    this.lastSeq = event.seq;
    this.root.dataset.lastSeq = String(event.seq);
    this.logEvent(event);
    const node = event.node_id ? this.nodes.get(event.node_id) : null;
    if (node) {
      if (event.type === "node.started") {
        node.state = "running";
        node.attempts = event.attempt || node.attempts + 1;
        node.started = event.time;
        node.ended = null;
      } else if (event.type === "node.completed") {
        node.state = "completed";
        node.ended = event.time;
        node.duration = event.duration;
        if (node.started === null && event.duration !== null) node.started = event.time - event.duration;
        if (event.output !== null) this.run.state = { ...(this.run.state || {}), [event.node_id]: event.output };
      } else if (event.type === "node.failed") {
        node.state = "failed";
        node.ended = event.time;
        node.attempts = Math.max(node.attempts, event.attempt || 0);
      } else if (event.type === "node.skipped") {
        node.state = "skipped";
      } else if (event.type === "run.status" && event.status === "WAITING") {
        node.state = "waiting"; // the node asking
        node.started = node.started ?? event.time;
      }
    }
    // Every event carries the run's status; a count of 0 is one the event does not carry.
    const run = { status: event.status };
    if (event.total_nodes) run.total_nodes = event.total_nodes;
    if (event.completed_nodes || event.type.startsWith("node.")) {
      run.completed_nodes = event.completed_nodes;
      run.progress_percent = event.progress_percent;
      run.eta_seconds = event.eta_seconds;
    }
    if (event.error) run.error = event.error;
    const wasWaiting = this.run.status === "WAITING";
    this.run = { ...this.run, ...run };
    if (event.status === "WAITING" && !wasWaiting) this.refresh();
    if (event.type === "checkpoint.saved") this.loadCheckpoints();
    this.showStatus();
    this.draw();
  }

  async refresh() {
    try {
      const view = await api(`/api/runs/${encodeURIComponent(this.run.run_id)}`);
      this.update(view.run);
    } catch (e) {
      notice(e.message, true);
    }
  }

  logEvent(event) {
    const parts = [`#${event.seq}`, event.type];
    if (event.node_id) parts.push(event.node_id);
    parts.push(event.status.toLowerCase());
    if (event.error) parts.push(event.error);
    this.events.append(el("li", { "data-seq": String(event.seq), "data-type": event.type, text: parts.join(" ") }));
  }

  drawTimeline() {
    const spans = [...this.nodes.entries()].filter(([, n]) => n.started !== null);
    if (!spans.length) {
      this.timeline.replaceChildren(el("p", { class: "muted", text: "No node has started yet." }));
      return;
    }
    const start = Math.min(...spans.map(([, n]) => n.started));
    const now = Date.now() / 1000;
    const end = Math.max(...spans.map(([, n]) => n.ended ?? now), start + 0.001);
    const rows = spans.map(([id, n]) => {
      const left = ((n.started - start) / (end - start)) * 100;
      const width = Math.max(0.5, (((n.ended ?? now) - n.started) / (end - start)) * 100);
      const bar = el("div", { class: `bar ${n.state}`, title: `${id}: ${duration((n.ended ?? now) - n.started)}` });
      bar.style.left = `${left}%`;
      bar.style.width = `${width}%`;
      return el("div", { class: "lane", "data-node-id": id }, el("span", { class: "name", text: id }), el("div", { class: "track" }, bar));
    });
    this.timeline.replaceChildren(...rows);
  }

  async loadCheckpoints() {
    let page;
    try {
      page = await api(`/api/runs/${encodeURIComponent(this.run.run_id)}/checkpoints?page_size=20`);
    } catch (e) {
      showError(this.checkpoints, e);
      return;
    }
    const head = el("tr", {}, ...["Checkpoint", "Step", "Trigger", "Name", "Done", "Saved", ""].map((h) => el("th", { text: h })));
    const rows = page.checkpoints.map((c) => {
      const fork = el("button", { class: "fork", text: "Fork…" });
      fork.addEventListener("click", () => this.forkForm(c, row));
      const row = el(
        "tr",
        { "data-checkpoint-id": c.checkpoint_id },
        el("td", { text: c.checkpoint_id }),
        el("td", { text: String(c.step) }),
        el("td", { text: c.trigger.toLowerCase() }),
        el("td", { text: c.name }),
        el("td", { text: c.completed_node_ids.join(", ") }),
        el("td", { text: when(c.created_at) }),
        el("td", {}, fork),
      );
      return row;
    });
    this.checkpoints.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  }

  forkForm(checkpoint, row) {
    const patch = el("textarea", { class: "fork-patch", rows: 4, "aria-label": "state patch (JSON object)" });
    patch.value = "{}";
    const error = el("p", { class: "error" });
    const form = el("form", { class: "fork-form" }, el("label", { text: "State patch (JSON object)" }), patch, el("button", { type: "submit", class: "fork-submit", text: "Fork a new run" }), error);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      let statePatch;
      try {
        statePatch = JSON.parse(patch.value || "{}");
      } catch (e) {
        error.textContent = `not JSON: ${e.message}`;
        return;
      }
      try {
        const done = await api(`/api/runs/${encodeURIComponent(this.run.run_id)}/fork`, {
          method: "POST",
          body: { checkpoint_id: checkpoint.checkpoint_id, state_patch: statePatch },
        });
        navigate(`/runs/${encodeURIComponent(done.run.run_id)}`);
      } catch (e) {
        error.textContent = e.message;
      }
    });
    const cell = el("td", { colspan: 7 }, form);
    row.after(el("tr", { class: "fork-row" }, cell));
  }
}

// ---- a workflow ------------------------------------------------------------------------

async function workflowPage(workflowId) {
  let view;
  try {
    view = await api(`/api/workflows/${encodeURIComponent(workflowId)}`);
  } catch (e) {
    showError(main, e);
    return;
  }
  const versions = el("table", { id: "versions" });
  const head = el("tr", {}, ...["Version", "Created", "Active", ""].map((h) => el("th", { text: h })));
  const rows = view.versions.map((v) => {
    const cell = el("td");
    if (!v.active) {
      const reason = el("input", { class: "rollback-reason", placeholder: "why" });
      const button = el("button", { class: "rollback", text: `Roll back to v${v.version}` });
      button.addEventListener("click", async () => {
        try {
          await api(`/api/workflows/${encodeURIComponent(workflowId)}/rollback`, {
            method: "POST",
            body: { version: v.version, reason: reason.value },
          });
          route();
        } catch (e) {
          notice(e.message, true);
        }
      });
      cell.append(reason, button);
    }
    return el("tr", { "data-version": String(v.version), "data-active": String(v.active) }, el("td", { text: `v${v.version}` }), el("td", { text: when(v.created_at) }), el("td", { text: v.active ? "active" : "" }), cell);
  });
  versions.append(el("thead", {}, head), el("tbody", {}, ...rows));
  const history = el("table", { id: "version-history" });
  history.append(
    el("thead", {}, el("tr", {}, ...["When", "What", "Version", "From", "Who", "Why"].map((h) => el("th", { text: h })))),
    el(
      "tbody",
      {},
      ...view.history.map((h) =>
        el("tr", {}, el("td", { text: when(h.time) }), el("td", { text: h.kind }), el("td", { text: `v${h.version}` }), el("td", { text: h.previous_version ? `v${h.previous_version}` : "" }), el("td", { text: h.requested_by }), el("td", { text: h.reason })),
      ),
    ),
  );
  const definition = el("pre", { id: "definition", text: JSON.stringify(view.definition, null, 2) });
  main.append(
    el("h1", { text: `Workflow ${workflowId}` }),
    el("p", {}, el("a", { href: `/runs?workflow_id=${encodeURIComponent(workflowId)}`, text: "Its runs" })),
    el("h2", { text: "Versions" }),
    versions,
    el("h2", { text: "Changes" }),
    history,
    el("h2", { text: `Definition (v${view.version})` }),
    definition,
  );
}

route();
