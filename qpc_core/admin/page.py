"""The operator status page served at ``/``: one self-contained HTML file, no external assets.

It polls ``/status.json`` (every second; ``?interval=MS`` changes that) and renders live
connections, queue depth, messages/s over the last five minutes (with a sparkline),
handshake p95, loaded plugins, version and uptime.  Every figure has a stable element id
(``conn``, ``queue``, ``rate1``, ``p95``, ...) so a browser test can wait on it.
"""

from __future__ import annotations

STATUS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qpc status</title>
<style>
  :root { color-scheme: light dark; --fg: #1d2330; --muted: #6b7280; --card: #f4f5f7;
          --accent: #2563eb; --bad: #b91c1c; --ok: #15803d; }
  @media (prefers-color-scheme: dark) {
    :root { --fg: #e5e7eb; --muted: #9ca3af; --card: #1f2937; --accent: #60a5fa; }
    body { background: #111827; }
  }
  body { font: 15px/1.4 system-ui, sans-serif; color: var(--fg); margin: 2rem auto;
         max-width: 60rem; padding: 0 1rem; }
  h1 { font-size: 1.4rem; margin: 0 0 .2rem; }
  .sub { color: var(--muted); margin-bottom: 1.2rem; }
  .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(12rem, 1fr));
          gap: .8rem; }
  .card { background: var(--card); border-radius: .5rem; padding: .8rem 1rem; }
  .label { color: var(--muted); font-size: .8rem; text-transform: uppercase; }
  .value { font-size: 1.8rem; font-variant-numeric: tabular-nums; }
  .small { font-size: .85rem; color: var(--muted); }
  #state.ok { color: var(--ok); } #state.bad, #cfg.bad { color: var(--bad); }
  svg { width: 100%; height: 80px; display: block; }
  table { border-collapse: collapse; width: 100%; margin-top: .4rem; }
  td, th { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid var(--card); }
</style>
</head>
<body>
<h1>qpc <span id="version">…</span></h1>
<div class="sub">state <b id="state">loading</b> · up <span id="uptime">…</span>
  · updated <span id="updated">never</span> <span id="error" class="small"></span>
  <br>configuration <b id="cfg">…</b><span id="pending" class="small"></span></div>
<div class="grid">
  <div class="card"><div class="label">connections</div>
    <div class="value" id="conn">…</div>
    <div class="small">of <span id="maxconn">…</span> max (<span id="connpct">…</span>)</div></div>
  <div class="card"><div class="label">queue depth</div>
    <div class="value" id="queue">…</div><div class="small">messages stored</div></div>
  <div class="card"><div class="label">messages/s (1 min)</div>
    <div class="value" id="rate1">…</div>
    <div class="small">5 min avg <span id="rate5">…</span></div></div>
  <div class="card"><div class="label">handshake p95 (5 min)</div>
    <div class="value" id="p95">…</div>
    <div class="small"><span id="handshakes">…</span> handshakes</div></div>
  <div class="card"><div class="label">in-flight RPCs</div>
    <div class="value" id="inflight">…</div></div>
  <div class="card"><div class="label">messages since start</div>
    <div class="value" id="enqueued">…</div>
    <div class="small"><span id="fetched">…</span> fetched</div></div>
</div>
<div class="card" style="margin-top:.8rem">
  <div class="label">messages enqueued per second, last 5 minutes</div>
  <svg id="spark" viewBox="0 0 300 80" preserveAspectRatio="none">
    <polyline id="sparkline" fill="none" stroke="currentColor" stroke-width="1.5"
      points=""></polyline></svg>
</div>
<div class="card" style="margin-top:.8rem">
  <div class="label">plugins (<span id="nplugins">…</span>)</div>
  <table><thead><tr><th>#</th><th>name</th><th>distribution</th><th>version</th></tr></thead>
  <tbody id="plugins"></tbody></table>
</div>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const interval = Math.max(100, parseInt(params.get("interval") || "1000", 10) || 1000);
const $ = (id) => document.getElementById(id);
function dur(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60), sec = s % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + sec + "s";
}
function set(id, text) { const el = $(id); if (el.textContent !== text) el.textContent = text; }
function render(st) {
  set("version", st.version);
  set("uptime", dur(st.uptime_secs));
  const state = $("state");
  set("state", st.draining ? "draining" : "serving");
  state.className = st.draining ? "bad" : "ok";
  set("conn", String(st.connections));
  set("maxconn", String(st.max_connections));
  set("connpct", (100 * st.connections / st.max_connections).toFixed(1) + "%");
  set("queue", st.queue_depth === null ? "n/a" : String(st.queue_depth));
  set("rate1", st.messages.rate_1m.toFixed(2));
  set("rate5", st.messages.rate_5m.toFixed(2));
  set("p95", st.handshake_p95_ms === null ? "n/a" : st.handshake_p95_ms.toFixed(1) + " ms");
  set("handshakes", String(st.handshakes_in_window));
  set("inflight", String(st.in_flight));
  set("enqueued", String(st.messages.enqueued_total));
  set("fetched", String(st.messages.fetched_total));
  const series = st.messages.per_second;
  const top = Math.max(1, ...series);
  const step = 300 / Math.max(1, series.length - 1);
  $("sparkline").setAttribute("points", series.map(
    (v, i) => (i * step).toFixed(1) + "," + (78 - 76 * v / top).toFixed(1)).join(" "));
  const c = st.config;
  set("cfg", c.reloaded_at === null ? "as started"
      : (c.reload_ok ? "reloaded " : "reload refused ") +
        new Date(c.reloaded_at * 1000).toLocaleTimeString());
  $("cfg").className = c.reload_ok === false ? "bad" : "";
  set("pending", c.restart_pending.length
      ? " · waiting for a restart: " + c.restart_pending.join(", ") : "");
  set("nplugins", String(st.plugins.length));
  const rows = st.plugins.map((p) => [p.order, p.name, p.distribution, p.version]);
  const key = JSON.stringify(rows);
  const body = $("plugins");
  if (body.dataset.key !== key) {
    body.dataset.key = key;
    body.replaceChildren(...rows.map((r) => {
      const tr = document.createElement("tr");
      for (const c of r) { const td = document.createElement("td");
                           td.textContent = String(c); tr.appendChild(td); }
      return tr;
    }));
  }
  set("updated", new Date().toLocaleTimeString());
  document.body.dataset.polls = String((parseInt(document.body.dataset.polls || "0", 10)) + 1);
}
async function poll() {
  try {
    const r = await fetch("status.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    set("error", "");
  } catch (e) {
    set("error", "(" + e.message + ")");
  } finally {
    setTimeout(poll, interval);
  }
}
poll();
</script>
</body>
</html>
"""
