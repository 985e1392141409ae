// The Tabbify mesh dashboard. Plain JavaScript, no framework, no network beyond this origin.
//
// Data: GET /v1/admin/session (the CSRF token), /v1/admin/members, /v1/admin/reach,
// /v1/policy, /v1/tokens; live updates from the admin SSE stream (/v1/admin/stream: one
// `member` or `member_remove` frame per change, `traffic` (a member's own report, at most
// one per member per heartbeat), `policy`, `resync`). Every change goes out
// with the session's CSRF token in `x-csrf-token`. Data is written with textContent only,
// never as HTML. The member table renders one page at a time (PAGE rows), so 1,000
// members cost one page of DOM. The reach graph draws classes of members (aggregated
// further by tags past GRAPH_MAX_NODES) as an SVG whose nodes are keyboard-focusable; the
// table under it says the same in text.
"use strict";

const PAGE = 50;
const GRAPH_MAX_NODES = 40;
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { csrf: null, members: new Map(), page: 0, filter: "", renderQueued: false, source: null };
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function showError(msg) {
  $("error").textContent = msg || "";
}

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["x-csrf-token"] = state.csrf || "";
  if (body !== undefined) headers["content-type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!resp.ok) {
    const err = new Error((data && data.error) || ("HTTP " + resp.status));
    err.status = resp.status;
    throw err;
  }
  return data;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = Number(n) || 0;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
}

// Seconds as a short age ("12 s", "3 min").
function age(s) {
  if (s < 60) return s + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

// What a member's own report says: totals, its newest handshake (aged to now) and how
// many of the peers it listed it reaches directly, through a relay or not at all.
function trafficCells(m) {
  const t = m.traffic;
  if (!t) return ["not reported", "not reported", "not reported"];
  const since = Math.max(0, Math.round((Date.now() - t.reported_ms) / 1000));
  const hs = t.peers.map((p) => p.last_handshake_secs).filter((x) => x !== undefined && x !== null);
  const newest = hs.length ? age(Math.min(...hs) + since) + " ago" : (t.peers.length ? "never" : "no peers");
  const n = { direct: 0, relay: 0, none: 0 };
  for (const p of t.peers) n[p.path] = (n[p.path] || 0) + 1;
  return [
    bytes(t.rx_bytes) + " / " + bytes(t.tx_bytes),
    newest,
    n.direct + " direct, " + n.relay + " relay, " + n.none + " none",
  ];
}

// ---- members -------------------------------------------------------------------------

function queueRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => { state.renderQueued = false; renderMembers(); });
}

function matches(m, f) {
  if (!f) return true;
  const hay = [m.display_name, m.identity, m.peer_id, m.ula, m.nat].concat(m.tags).join(" ").toLowerCase();
  return hay.includes(f);
}

function renderMembers() {
  const all = Array.from(state.members.values())
    .filter((m) => matches(m, state.filter))
    .sort((a, b) => a.display_name.localeCompare(b.display_name) || a.peer_id.localeCompare(b.peer_id));
  const pages = Math.max(1, Math.ceil(all.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const rows = all.slice(state.page * PAGE, state.page * PAGE + PAGE);
  const body = $("member-rows");
  const frag = document.createDocumentFragment();
  for (const m of rows) {
    const tr = el("tr");
    tr.dataset.peer = m.peer_id;
    const name = el("td");
    name.append(el("span", m.display_name), el("br"), el("code", m.peer_id));
    tr.append(name);
    tr.append(el("td", m.tags.join(", ")));
    tr.append(el("td", m.ula));
    tr.append(el("td", m.nat.replace(/_/g, " ")));
    tr.append(el("td", m.paths.direct + " / " + m.paths.relay));
    const [rxtx, hs, path] = trafficCells(m);
    tr.append(el("td", rxtx, "traffic-rxtx"));
    tr.append(el("td", hs, "traffic-handshake"));
    tr.append(el("td", path, "traffic-path"));
    tr.append(el("td", ago(m.last_seen_ms)));
    tr.append(el("td", m.stale ? "stale" : "live", m.stale ? "stale" : "fresh"));
    const act = el("td");
    const b = el("button", "Revoke", "danger");
    b.type = "button";
    b.setAttribute("aria-label", "Revoke " + m.display_name);
    b.addEventListener("click", () => revokeMember(m));
    act.append(b);
    tr.append(act);
    frag.append(tr);
  }
  body.replaceChildren(frag);
  $("member-count").textContent = "(" + state.members.size + ")";
  $("page").textContent = "Page " + (state.page + 1) + " of " + pages + " (" + all.length + " shown)";
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.page >= pages - 1;
}

async function loadMembers() {
  const r = await api("GET", "/v1/admin/members");
  state.members = new Map(r.members.map((m) => [m.peer_id, m]));
  queueRender();
}

async function revokeMember(m) {
  if (!window.confirm("Revoke " + m.display_name + " (" + m.identity + ")? It leaves every roster now.")) return;
  try {
    await api("DELETE", "/v1/mesh/peers/" + encodeURIComponent(m.peer_id));
    showError("");
  } catch (e) { showError("Revoking " + m.display_name + ": " + e.message); }
}

// ---- reach and policy ----------------------------------------------------------------

// The graph's nodes: the reach classes, or past GRAPH_MAX_NODES, the classes merged by
// their tags (a `peer:` selector's class joins its tags' node), edges merged alike.
function graphModel(r) {
  let key = (c) => String(c.id);
  let name = (c) => c.label;
  if (r.classes.length > GRAPH_MAX_NODES) {
    const tagsOf = (c) => c.label.split(" ").filter((w) => !w.startsWith("peer:")).join(" ") || "(no tags)";
    key = tagsOf;
    name = tagsOf;
  }
  const nodes = new Map();
  const nodeOf = new Map();
  for (const c of r.classes) {
    const k = key(c);
    if (!nodes.has(k)) nodes.set(k, { key: k, label: name(c), members: 0 });
    nodes.get(k).members += c.members.length;
    nodeOf.set(c.id, k);
  }
  const edges = new Map();
  for (const e of r.edges) {
    const from = nodeOf.get(e.from);
    const to = nodeOf.get(e.to);
    if (from === undefined || to === undefined) continue;
    const k = from + "\u0000" + to;
    if (!edges.has(k)) edges.set(k, { from, to, ports: new Set() });
    for (const p of e.ports.split(",")) edges.get(k).ports.add(p);
  }
  return { nodes: Array.from(nodes.values()), edges: Array.from(edges.values()), merged: r.classes.length > GRAPH_MAX_NODES };
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function describeNode(model, n) {
  const out = model.edges.filter((e) => e.from === n.key && e.to !== n.key);
  const inn = model.edges.filter((e) => e.to === n.key && e.from !== n.key);
  const self = model.edges.find((e) => e.from === n.key && e.to === n.key);
  const label = (k) => model.nodes.find((x) => x.key === k).label;
  const parts = [n.label + " (" + n.members + (n.members === 1 ? " member)" : " members)")];
  parts.push(out.length ? "may reach " + out.map((e) => label(e.to) + " on " + Array.from(e.ports).join(",")).join("; ") : "may reach no other class");
  parts.push(inn.length ? "reached by " + inn.map((e) => label(e.from)).join(", ") : "reached by no other class");
  if (self) parts.push("members reach each other on " + Array.from(self.ports).join(","));
  return parts.join("; ") + ".";
}

function drawReachGraph(r) {
  const model = graphModel(r);
  const box = $("reach-graph");
  const n = model.nodes.length;
  if (!n) { box.replaceChildren(el("p", "No members yet.")); return; }
  const size = 520;
  const c = size / 2;
  const radius = n === 1 ? 0 : c - 90;
  const pos = new Map();
  model.nodes.forEach((node, i) => {
    const a = (2 * Math.PI * i) / n - Math.PI / 2;
    pos.set(node.key, { x: c + radius * Math.cos(a), y: c + radius * Math.sin(a) });
  });
  const root = svg("svg", { viewBox: "0 0 " + size + " " + size, width: "100%", class: "graph", role: "group", "aria-labelledby": "reach-graph-label" });
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }));
  defs.append(marker);
  root.append(defs);
  const nameOf = (k) => model.nodes.find((x) => x.key === k).label;
  const edgeLayer = svg("g", { "aria-hidden": "true" });
  const nodeR = 16;
  const edgeEls = [];
  for (const e of model.edges) {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    let d;
    if (e.from === e.to) {
      // A loop above the node: its members reach each other.
      d = "M " + (a.x - 8) + " " + (a.y - nodeR) + " C " + (a.x - 30) + " " + (a.y - 60) + " " + (a.x + 30) + " " + (a.y - 60) + " " + (a.x + 8) + " " + (a.y - nodeR);
    } else {
      // A curve bent to the right of its direction, so A→B and B→A stay apart.
      const dx = b.x - a.x;
      const dy = b.y - a.y;
      const len = Math.hypot(dx, dy) || 1;
      const ux = dx / len;
      const uy = dy / len;
      const sx = a.x + ux * nodeR;
      const sy = a.y + uy * nodeR;
      const tx = b.x - ux * (nodeR + 2);
      const ty = b.y - uy * (nodeR + 2);
      const mx = (sx + tx) / 2 - uy * 0.15 * len;
      const my = (sy + ty) / 2 + ux * 0.15 * len;
      d = "M " + sx + " " + sy + " Q " + mx + " " + my + " " + tx + " " + ty;
    }
    const p = svg("path", { d, class: "edge", "marker-end": "url(#arrow)" });
    const t = svg("title");
    t.textContent = nameOf(e.from) + " → " + nameOf(e.to) + ": " + Array.from(e.ports).join(",");
    p.append(t);
    edgeEls.push({ e, p });
    edgeLayer.append(p);
  }
  root.append(edgeLayer);
  const nodeEls = [];
  const select = (i) => {
    const node = model.nodes[i];
    for (const { e, p } of edgeEls) {
      p.classList.toggle("out", e.from === node.key);
      p.classList.toggle("in", e.to === node.key && e.from !== node.key);
    }
    nodeEls.forEach((g, j) => g.classList.toggle("selected", j === i));
    $("reach-detail").textContent = describeNode(model, node);
  };
  model.nodes.forEach((node, i) => {
    const { x, y } = pos.get(node.key);
    const g = svg("g", { class: "node", tabindex: 0, role: "button", "aria-label": node.label + ", " + node.members + " members: show whom it may reach" });
    g.append(svg("circle", { cx: x, cy: y, r: nodeR }));
    const count = svg("text", { x, y: y + 4, "text-anchor": "middle", class: "count" });
    count.textContent = String(node.members);
    const label = svg("text", { x, y: y + nodeR + 14, "text-anchor": "middle", class: "label" });
    label.textContent = node.label.length > 28 ? node.label.slice(0, 27) + "…" : node.label;
    g.append(count, label);
    g.addEventListener("click", () => select(i));
    g.addEventListener("focus", () => select(i));
    g.addEventListener("keydown", (ev) => {
      let j = null;
      if (ev.key === "ArrowRight" || ev.key === "ArrowDown") j = (i + 1) % n;
      if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") j = (i + n - 1) % n;
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(i); }
      if (j !== null) { ev.preventDefault(); nodeEls[j].focus(); }
    });
    nodeEls.push(g);
    root.append(g);
  });
  $("reach-graph-note").textContent = model.merged
    ? "Many classes: nodes merge the classes that share tags (" + n + " nodes for " + r.classes.length + " classes)."
    : n + " classes of members; arrows point from the member who may open a connection to its target.";
  box.replaceChildren(root);
}

async function loadReach() {
  const r = await api("GET", "/v1/admin/reach");
  drawReachGraph(r);
  const label = new Map(r.classes.map((c) => [c.id, c.label + " (" + c.members.length + ")"]));
  const frag = document.createDocumentFragment();
  for (const e of r.edges) {
    const tr = el("tr");
    tr.append(el("td", label.get(e.from)), el("td", label.get(e.to)), el("td", e.ports));
    frag.append(tr);
  }
  if (!r.edges.length) {
    const tr = el("tr");
    const td = el("td", "No member may reach another under this policy.");
    td.colSpan = 3;
    tr.append(td);
    frag.append(tr);
  }
  $("reach-rows").replaceChildren(frag);
}

async function loadPolicy() {
  const r = await api("GET", "/v1/policy");
  $("policy-rev").textContent = "(revision " + r.revision + ")";
  $("policy-doc").textContent = JSON.stringify(r.policy, null, 2);
}

async function testPolicy(ev) {
  ev.preventDefault();
  const out = $("t-result");
  out.textContent = "Testing…";
  try {
    const r = await api("POST", "/v1/policy/test", {
      src: $("t-src").value.trim(),
      dst: $("t-dst").value.trim(),
      proto: $("t-proto").value,
      port: Number($("t-port").value),
    });
    out.replaceChildren(
      el("strong", r.allowed ? "Allowed" : "Refused", r.allowed ? "fresh" : "stale"),
      el("span", ": " + r.reason),
    );
    if (r.rule) out.append(el("pre", JSON.stringify(r.rule, null, 2)));
  } catch (e) { out.textContent = "Error: " + e.message; }
}

// ---- tokens --------------------------------------------------------------------------

async function loadTokens() {
  const list = await api("GET", "/v1/tokens");
  const frag = document.createDocumentFragment();
  for (const t of list) {
    const tr = el("tr");
    tr.dataset.token = t.token_id;
    tr.append(el("td", t.token_id), el("td", t.tags.join(", ")),
      el("td", t.uses + " / " + (t.max_uses === 0 ? "unlimited" : t.max_uses)),
      el("td", new Date(t.expires_at * 1000).toISOString()));
    const act = el("td");
    const b = el("button", "Revoke", "danger");
    b.type = "button";
    b.setAttribute("aria-label", "Revoke token " + t.token_id);
    b.addEventListener("click", async () => {
      try { await api("DELETE", "/v1/tokens/" + encodeURIComponent(t.token_id)); await loadTokens(); }
      catch (e) { showError("Revoking token " + t.token_id + ": " + e.message); }
    });
    act.append(b);
    tr.append(act);
    frag.append(tr);
  }
  $("token-rows").replaceChildren(frag);
}

async function mintToken(ev) {
  ev.preventDefault();
  const out = $("m-result");
  const tags = $("m-tags").value.split(",").map((s) => s.trim()).filter(Boolean);
  try {
    const r = await api("POST", "/v1/tokens", {
      tags, ttl_secs: Number($("m-ttl").value), max_uses: Number($("m-uses").value),
    });
    out.replaceChildren(el("span", "Token " + r.token_id + " (shown once): "), el("code", r.token, "secret"));
    await loadTokens();
  } catch (e) { out.textContent = "Error: " + e.message; }
}

// ---- live updates --------------------------------------------------------------------

function connect() {
  const src = new EventSource("/v1/admin/stream");
  state.source = src;
  src.onopen = () => { $("live").textContent = "Live: updates arrive as they happen."; };
  src.onerror = () => { $("live").textContent = "Live updates interrupted; reconnecting…"; };
  src.addEventListener("member", (e) => {
    const m = JSON.parse(e.data);
    state.members.set(m.peer_id, m);
    queueRender();
  });
  src.addEventListener("traffic", (e) => {
    const { peer_id, traffic } = JSON.parse(e.data);
    const m = state.members.get(peer_id);
    if (!m) return;
    m.traffic = traffic;
    queueRender();
  });
  src.addEventListener("member_remove", (e) => {
    const { peer_id } = JSON.parse(e.data);
    state.members.delete(peer_id);
    queueRender();
  });
  src.addEventListener("policy", () => { loadPolicy().catch(() => {}); loadReach().catch(() => {}); });
  src.addEventListener("resync", () => { loadMembers().catch(() => {}); loadReach().catch(() => {}); });
}

// ---- start ---------------------------------------------------------------------------

async function start() {
  $("filter").addEventListener("input", () => { state.filter = $("filter").value.trim().toLowerCase(); state.page = 0; queueRender(); });
  $("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); queueRender(); });
  $("next").addEventListener("click", () => { state.page += 1; queueRender(); });
  $("tester").addEventListener("submit", testPolicy);
  $("mint").addEventListener("submit", mintToken);
  $("logout").addEventListener("click", async () => {
    try { await api("DELETE", "/v1/admin/session"); } catch (_) { /* already gone */ }
    if (state.source) state.source.close();
    window.location.reload();
  });
  try {
    const s = await api("GET", "/v1/admin/session");
    state.csrf = s.csrf_token;
    $("session").textContent = "Signed in as " + s.admin + " until " + new Date(s.expires_at * 1000).toLocaleString() + ".";
    $("logout").hidden = false;
  } catch (e) {
    $("session").textContent = "Not signed in: run `tabbify-mesh-coordinator admin-login` and open the link it prints.";
    return;
  }
  connect();
  try {
    await Promise.all([loadMembers(), loadReach(), loadPolicy(), loadTokens()]);
  } catch (e) { showError(e.message); }
  setInterval(queueRender, 30000); // "last seen" ages; no requests
}

start();
