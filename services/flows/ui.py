"""The service map page: one self-contained HTML document (inline CSS + JS + SVG).

Invariants:
- The page loads nothing from anywhere but its own origin: no CDN, no fonts, no images;
  it polls ``/api/servicemap`` (same origin) once a second and redraws an SVG.
- Layout is deterministic: namespaces become boxes (sorted, laid out left to right and
  wrapped), workloads sit in a grid inside their box sorted by id, reserved identities
  (world, host, …) in a box of their own; so nodes do not jump between polls.
- Edges are coloured by verdict class (forwarded green, dropped red, audit amber), drawn
  wider for more flows and labelled with their flow count.
"""

from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ciliary service map</title>
<style>
  :root { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; color: #1d2433; }
  body { margin: 0; background: #f4f6f9; }
  header { display: flex; align-items: baseline; gap: 24px; padding: 10px 18px;
           background: #1d2433; color: #fff; }
  header h1 { font-size: 18px; margin: 0; }
  header .stat { font-size: 13px; opacity: .85; }
  #legend { display: flex; gap: 16px; padding: 6px 18px; font-size: 13px; }
  #legend span.sw { display: inline-block; width: 22px; height: 4px; margin-right: 6px;
                    vertical-align: middle; border-radius: 2px; }
  #controls { padding: 0 18px; font-size: 13px; }
  svg { display: block; margin: 0 auto; }
  .nsbox { fill: #fff; stroke: #b7c0cf; stroke-width: 1.2; }
  .nsbox.reserved { fill: #eef1f6; stroke-dasharray: 5 4; }
  .nslabel { font-size: 13px; font-weight: bold; fill: #4a5568; }
  .node rect { fill: #e8f0fe; stroke: #3a66c4; stroke-width: 1.5; }
  .node.reserved rect { fill: #fdf2e3; stroke: #a26a1a; }
  .node.Service rect { fill: #f1e8fd; stroke: #6b3ac4; }
  .node text { font-size: 12px; fill: #1d2433; }
  .node text.kind { font-size: 10px; fill: #5a6478; }
  .edge { fill: none; }
  .elabel { font-size: 11px; font-weight: bold; paint-order: stroke; stroke: #fff;
            stroke-width: 3px; }
  table { border-collapse: collapse; margin: 8px 18px 18px; font-size: 12px; }
  td, th { border-bottom: 1px solid #d5dbe5; padding: 3px 10px; text-align: left; }
  #error { color: #d93636; padding: 0 18px; font-size: 13px; }
</style>
</head>
<body>
<header><h1>ciliary service map</h1>
  <span class="stat" id="stats">loading…</span></header>
<div id="legend">
  <span><span class="sw" style="background:#2e9d4f"></span>forwarded</span>
  <span><span class="sw" style="background:#d93636"></span>dropped</span>
  <span><span class="sw" style="background:#e0a100"></span>audit</span>
  <span id="controls">window
    <select id="since">
      <option value="">all stored flows</option>
      <option value="5m">last 5 minutes</option>
      <option value="1m">last minute</option>
    </select></span>
</div>
<div id="error"></div>
<svg id="map" xmlns="http://www.w3.org/2000/svg" width="1160" height="560"></svg>
<table id="edges"><thead><tr><th>source</th><th>destination</th><th>verdict</th>
  <th>flows</th><th>ports</th><th>details</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const W = 1160, NODE_W = 160, NODE_H = 40, PAD = 22, GAP_X = 110, GAP_Y = 80, BOX_GAP = 90;

function el(name, attrs, text) {
  const e = document.createElementNS(SVGNS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}

function layout(map) {
  const groups = new Map();
  for (const n of map.nodes) {
    const g = n.namespace || "";
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(n);
  }
  const names = [...groups.keys()].filter(g => g !== "").sort();
  if (groups.has("")) names.push("");
  const pos = new Map(), boxes = [];
  let x = PAD, y = PAD, rowH = 0;
  for (const g of names) {
    const nodes = groups.get(g).slice().sort((a, b) => a.id < b.id ? -1 : 1);
    const cols = Math.max(1, Math.min(3, Math.ceil(Math.sqrt(nodes.length))));
    const rows = Math.ceil(nodes.length / cols);
    const bw = cols * NODE_W + (cols - 1) * GAP_X + 2 * PAD;
    const bh = rows * NODE_H + (rows - 1) * GAP_Y + 2 * PAD + 22;
    if (x + bw > W - PAD && x > PAD) { x = PAD; y += rowH + BOX_GAP; rowH = 0; }
    boxes.push({name: g, x, y, w: bw, h: bh});
    nodes.forEach((n, i) => {
      const c = i % cols, r = Math.floor(i / cols);
      pos.set(n.id, {x: x + PAD + c * (NODE_W + GAP_X), y: y + PAD + 22 + r * (NODE_H + GAP_Y)});
    });
    x += bw + BOX_GAP; rowH = Math.max(rowH, bh);
  }
  return {pos, boxes, height: y + rowH + PAD};
}

function anchor(p, q) {
  // the point on the border of node box p facing q's centre
  const cx = p.x + NODE_W / 2, cy = p.y + NODE_H / 2;
  const dx = q.x + NODE_W / 2 - cx, dy = q.y + NODE_H / 2 - cy;
  if (dx === 0 && dy === 0) return {x: cx, y: cy};
  const sx = Math.abs(dx) / (NODE_W / 2), sy = Math.abs(dy) / (NODE_H / 2);
  const s = 1 / Math.max(sx, sy);
  return {x: cx + dx * s, y: cy + dy * s};
}

function render(map) {
  const svg = document.getElementById("map");
  const {pos, boxes, height} = layout(map);
  svg.setAttribute("height", Math.max(300, height));
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs", {});
  for (const [cls, colour] of [["forwarded", "#2e9d4f"], ["dropped", "#d93636"], ["audit", "#e0a100"]]) {
    const m = el("marker", {id: "arrow-" + cls, viewBox: "0 0 10 10", refX: 9, refY: 5,
                            markerWidth: 11, markerHeight: 11, markerUnits: "userSpaceOnUse",
                            orient: "auto-start-reverse"});
    m.appendChild(el("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: colour}));
    defs.appendChild(m);
  }
  svg.appendChild(defs);
  for (const b of boxes) {
    svg.appendChild(el("rect", {class: "nsbox" + (b.name ? "" : " reserved"), x: b.x, y: b.y,
                                width: b.w, height: b.h, rx: 10}));
    svg.appendChild(el("text", {class: "nslabel", x: b.x + 10, y: b.y + 18},
                       b.name ? "namespace " + b.name : "outside the cluster / reserved"));
  }
  // edges between the same pair of nodes fan out
  const pairCount = new Map(), pairIndex = new Map();
  for (const e of map.edges) {
    const k = [e.source, e.destination].sort().join("|");
    pairCount.set(k, (pairCount.get(k) || 0) + 1);
  }
  const maxFlows = Math.max(1, ...map.edges.map(e => e.flows));
  const labels = [];
  for (const e of map.edges) {
    const p = pos.get(e.source), q = pos.get(e.destination);
    if (!p || !q) continue;
    const k = [e.source, e.destination].sort().join("|");
    const i = pairIndex.get(k) || 0; pairIndex.set(k, i + 1);
    const n = pairCount.get(k);
    const width = 1.5 + 4 * Math.log1p(e.flows) / Math.log1p(maxFlows);
    let d, lx, ly;
    if (e.source === e.destination) {
      const cx = p.x + NODE_W / 2, top = p.y;
      d = `M ${cx - 20} ${top} C ${cx - 40} ${top - 45}, ${cx + 40} ${top - 45}, ${cx + 20} ${top}`;
      lx = cx; ly = top - 36 - 12 * i;
    } else {
      const a = anchor(p, q), b = anchor(q, p);
      const mx = (a.x + b.x) / 2, my = (a.y + b.y) / 2;
      const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
      const dir = e.source < e.destination ? 1 : -1;
      const bend = (n === 1 ? 0.12 : 0.12 + 0.18 * i) * len * dir;
      const cx = mx - dy / len * bend, cy = my + dx / len * bend;
      d = `M ${a.x} ${a.y} Q ${cx} ${cy} ${b.x} ${b.y}`;
      lx = (a.x + 2 * cx + b.x) / 4; ly = (a.y + 2 * cy + b.y) / 4;
    }
    const path = el("path", {class: "edge verdict-" + e.verdict, d, stroke: e.colour,
                             "stroke-width": width.toFixed(1), "marker-end": `url(#arrow-${e.verdict})`,
                             "data-source": e.source, "data-destination": e.destination});
    path.appendChild(el("title", {}, `${e.source} → ${e.destination}: ${e.flows} ${e.verdict} flows`));
    svg.appendChild(path);
    let text = String(e.flows);
    const l7 = Object.entries(e.l7 || {}).filter(([k]) => k.endsWith("request"));
    if (l7.length) text += " · " + l7.map(([k, v]) => `${v} ${k.split("-")[0]}`).join(" ");
    labels.push(el("text", {class: "elabel", x: lx, y: ly, fill: e.colour, "text-anchor": "middle"}, text));
  }
  for (const n of map.nodes) {
    const p = pos.get(n.id);
    const g = el("g", {class: "node " + (n.kind === "reserved" ? "reserved" : n.kind), "data-id": n.id});
    g.appendChild(el("rect", {x: p.x, y: p.y, width: NODE_W, height: NODE_H, rx: 7}));
    const label = n.label.length > 22 ? n.label.slice(0, 21) + "…" : n.label;
    g.appendChild(el("text", {x: p.x + 8, y: p.y + 17}, label));
    const kind = n.kind === "reserved" ? "reserved identity" :
      n.kind + (n.pods.length > 1 ? ` · ${n.pods.length} pods` : "") + (n.identity ? ` · ID ${n.identity}` : "");
    g.appendChild(el("text", {class: "kind", x: p.x + 8, y: p.y + 32}, kind));
    const title = [n.id, ...n.pods.map(x => "pod " + x), ...n.labels].join("\n");
    g.appendChild(el("title", {}, title));
    svg.appendChild(g);
  }
  for (const l of labels) svg.appendChild(l);

  const tbody = document.querySelector("#edges tbody");
  tbody.textContent = "";
  for (const e of map.edges) {
    const tr = document.createElement("tr");
    const details = [
      ...Object.entries(e.drop_reasons).map(([k, v]) => `${k}: ${v}`),
      ...e.services.map(s => "via service " + s),
      ...Object.entries(e.l7).map(([k, v]) => `${k}: ${v}`),
    ].join(", ");
    for (const v of [e.source, e.destination, e.verdict, e.flows, e.ports.join(" "), details]) {
      const td = document.createElement("td"); td.textContent = String(v); tr.appendChild(td);
    }
    tr.style.color = e.colour;
    tbody.appendChild(tr);
  }
  const t = map.totals;
  document.getElementById("stats").textContent =
    `${map.nodes.length} workloads · ${map.edges.length} edges · ${t.forwarded} forwarded · ` +
    `${t.dropped} dropped · ${t.audit} audit · ${map.seen} flows seen · ${map.lost} lost · ` +
    `updated ${new Date().toISOString().slice(11, 19)} UTC`;
  document.body.setAttribute("data-edges", String(map.edges.length));
}

async function poll() {
  const since = document.getElementById("since").value;
  try {
    const r = await fetch("/api/servicemap" + (since ? "?since=" + since : ""), {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.getElementById("error").textContent = "";
  } catch (err) {
    document.getElementById("error").textContent = "cannot load /api/servicemap: " + err;
  }
}
poll();
setInterval(poll, 1000);
</script>
</body>
</html>
"""
