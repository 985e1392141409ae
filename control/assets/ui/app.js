// The Tabbify mesh dashboard. Plain JavaScript, no framework, no network beyond this origin.
//
// Data: GET /v1/admin/session (the CSRF token), /v1/admin/members, /v1/admin/reach,
// /v1/policy, /v1/tokens; live updates from the admin SSE stream (/v1/admin/stream: one
// `member` or `member_remove` frame per change, `policy`, `resync`). Every change goes out
// with the session's CSRF token in `x-csrf-token`. Data is written with textContent only,
// never as HTML. The member table renders one page at a time (PAGE rows), so 1,000
// members cost one page of DOM.
"use strict";

const PAGE = 50;
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

async function loadReach() {
  const r = await api("GET", "/v1/admin/reach");
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
