// The cluster page: polls /api/cluster and redraws the map, the pools, the nodes and the events.
// Everything is built with DOM calls and textContent: names come from users, never as HTML.
"use strict";

const POLL_MS = 1500;
const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_INSTANCES_SHOWN = 12; // per node card; the rest are counted

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text != null) node.textContent = text;
  return node;
}

// Equirectangular: x is longitude + 180, y is 90 - latitude (the map's viewBox crops the poles).
const px = (lon) => lon + 180;
const py = (lat) => 90 - lat;

function ringPath(ring) {
  return ring.map(([lon, lat], i) => `${i ? "L" : "M"}${px(lon).toFixed(1)},${py(lat).toFixed(1)}`)
    .join("") + "Z";
}

function drawWorld(map) {
  const grid = svg("g");
  for (let lon = -150; lon <= 150; lon += 30) {
    grid.append(svg("line", { class: "grid", x1: px(lon), x2: px(lon), y1: 0, y2: 180 }));
  }
  for (let lat = -60; lat <= 80; lat += 20) {
    grid.append(svg("line", { class: "grid", x1: 0, x2: 360, y1: py(lat), y2: py(lat) }));
  }
  map.append(grid);
  map.append(svg("path", { class: "land", d: WORLD_LAND.map(ringPath).join("") }));
  map.append(svg("path", { class: "water", d: WORLD_WATER.map(ringPath).join("") }));
  const layer = svg("g", { id: "map-points" });
  map.append(layer);
  return layer;
}

const fmt = {
  pct: (v) => (v == null ? "–" : `${Math.round(v)}%`),
  vcpu: (v) => (Math.round(v * 100) / 100).toString(),
  gib: (mib) => (mib / 1024).toFixed(mib >= 10240 ? 0 : 1),
  mem: (bytes) => (bytes < 1048576 ? `${Math.round(bytes / 1024)} KiB` : `${Math.round(bytes / 1048576)} MiB`),
  time: (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false }),
};

// What a state's badge says on hover, where the word alone may mislead.
const STATE_TITLES = {
  running: "running, not healthy: its health checks fail, or its port has not answered yet",
  healthy: "running, its port answers and its health checks pass",
};

function badge(text, kind) {
  const props = { className: `badge ${kind || text}`, text };
  if (STATE_TITLES[text]) props.title = STATE_TITLES[text];
  return el("span", props);
}

function renderSummary(data) {
  const s = data.summary;
  const items = [
    [s.nodes_alive, "node alive", "nodes alive"],
    [s.nodes_lost, "lost", "lost"],
    [s.instances, "instance", "instances"],
    [s.awake, "awake", "awake"],
    [s.pools, "pool", "pools"],
    [data.edges.length, "edge", "edges"],
  ];
  document.getElementById("summary").replaceChildren(...items.map(([n, one, many]) =>
    el("li", {}, el("b", { text: String(n) }), ` ${n === 1 ? one : many}`)));
}

function renderMap(layer, data) {
  const points = [];
  // Nodes in one region share coordinates: spread them on a small ring around the point.
  const byPlace = new Map();
  for (const node of data.nodes) {
    if (node.latitude == null || node.longitude == null) continue;
    const key = `${node.latitude},${node.longitude}`;
    if (!byPlace.has(key)) byPlace.set(key, []);
    byPlace.get(key).push(node);
  }
  for (const edge of data.edges) {
    if (edge.latitude == null) continue;
    const x = px(edge.longitude), y = py(edge.latitude);
    const diamond = svg("path", { class: "edge", d: `M${x},${y - 3.4}L${x + 3.4},${y}L${x},${y + 3.4}L${x - 3.4},${y}Z` });
    diamond.append(svg("title", {}, `edge ${edge.id} (${edge.region}): ${edge.requests_per_second} req/s`));
    points.push(diamond);
  }
  for (const nodes of byPlace.values()) {
    const x0 = px(nodes[0].longitude), y0 = py(nodes[0].latitude);
    const spread = nodes.length > 1 ? 2.6 : 0;
    nodes.forEach((node, i) => {
      const angle = (2 * Math.PI * i) / nodes.length - Math.PI / 2;
      const x = x0 + spread * Math.cos(angle), y = y0 + spread * Math.sin(angle);
      const awake = node.instances.filter((inst) => inst.awake).length;
      if (node.alive && awake) points.push(svg("circle", { class: "halo", cx: x, cy: y, r: 2.2 + Math.min(awake, 8) * 0.5 }));
      const dot = svg("circle", { class: `node ${node.alive ? "alive" : "lost"}`, cx: x, cy: y, r: 2 });
      dot.append(svg("title", {}, `${node.id} (${node.region}${node.city ? ", " + node.city : ""}): ` +
        `${node.alive ? "alive" : "lost"}, ${awake} awake of ${node.instances.length} instances`));
      points.push(dot);
    });
    const region = nodes[0].region || "?";
    const awake = nodes.reduce((n, node) => n + node.instances.filter((i) => i.awake).length, 0);
    // Labels go right of the point, or left of it near the map's right edge.
    const right = x0 < 320;
    const lx = right ? x0 + spread + 3 : x0 - spread - 3, anchor = right ? "start" : "end";
    points.push(svg("text", { class: "label", x: lx, y: y0 + 1.2, "text-anchor": anchor }, region));
    const detail = `${nodes.length} node${nodes.length > 1 ? "s" : ""} · ${awake} awake`;
    points.push(svg("text", { class: "sublabel", x: lx, y: y0 + 4.8, "text-anchor": anchor }, detail));
  }
  layer.replaceChildren(...points);
}

function renderPools(data) {
  const box = document.getElementById("pools");
  if (!data.pools.length) {
    box.replaceChildren(el("p", { className: "empty", text: "No autoscaled pools deployed." }));
    return;
  }
  box.replaceChildren(...data.pools.map((pool) => {
    // The bar's scale: up to 100%, or further when the target or the load goes beyond it.
    const scale = Math.max(100, pool.cpu_target * 1.25, pool.cpu_percent || 0);
    const fill = el("div", { className: "fill" });
    fill.style.width = `${Math.min(100, ((pool.cpu_percent || 0) / scale) * 100)}%`;
    if (pool.cpu_percent != null && pool.cpu_percent > pool.cpu_target) fill.classList.add("over");
    const target = el("div", { className: "target", title: `target ${pool.cpu_target}%` });
    target.style.left = `${(pool.cpu_target / scale) * 100}%`;
    const ready = pool.members.filter((m) => m.ready && !m.draining).length;
    const members = pool.members.map((m) => {
      const small = el("div", { className: "fill" });
      small.style.width = `${Math.min(100, ((m.cpu_percent || 0) / scale) * 100)}%`;
      // A member that is not ready (unhealthy, or still booting) gets no traffic: its badge says so.
      const state = m.draining ? badge("draining") : m.ready ? fmt.pct(m.cpu_percent) : badge(m.state);
      return el("div", { title: `${m.name} on ${m.node_id}` }, `${m.name} `, state,
        el("div", { className: "bar small" }, small));
    });
    return el("div", { className: "pool" },
      el("div", { className: "pool-head" }, el("b", { text: pool.class_name }),
        el("span", { text: `CPU ${fmt.pct(pool.cpu_percent)} / target ${fmt.pct(pool.cpu_target)}` })),
      el("div", { className: "bar" }, fill, target),
      el("div", { className: "muted", text: `${ready} ready of ${pool.members.length} · min ${pool.minimum_instances} · max ${pool.maximum_instances || "∞"} · ${pool.instance_type}` }),
      el("div", { className: "members" }, ...members));
  }));
}

function renderNodes(data) {
  const box = document.getElementById("nodes");
  if (!data.nodes.length) {
    box.replaceChildren(el("p", { className: "empty", text: "No node has registered yet: start one with portside agent." }));
    return;
  }
  box.replaceChildren(...data.nodes.map((node) => {
    const where = node.region ? `${node.region}${node.city ? " · " + node.city : ""}` : "region unknown";
    const use = node.alive
      ? `vCPU ${fmt.vcpu(node.used_vcpu)}/${fmt.vcpu(node.vcpu)} · memory ${fmt.gib(node.used_memory_mib)}/${fmt.gib(node.memory_mib)} GiB`
      : "lost: its lease expired";
    const rows = node.instances.slice(0, MAX_INSTANCES_SHOWN).map((inst) => {
      const numbers = [];
      if (inst.cpu_percent != null) numbers.push(`cpu ${fmt.pct(inst.cpu_percent)}`);
      if (inst.awake && inst.memory_bytes) numbers.push(fmt.mem(inst.memory_bytes));
      if (inst.in_flight) numbers.push(`${inst.in_flight} in flight`);
      return el("li", {}, badge(inst.draining ? "draining" : inst.state),
        el("span", { className: "iname", title: inst.instance_id, text: `${inst.class_name}/${inst.name}` }),
        el("span", { className: "inum", text: numbers.join(" · ") }));
    });
    const more = node.instances.length - rows.length;
    if (more > 0) rows.push(el("li", { className: "muted", text: `and ${more} more` }));
    if (!rows.length) rows.push(el("li", { className: "empty", text: "no instances" }));
    if (node.unplaced_awake) rows.push(el("li", { className: "muted", text: `${node.unplaced_awake} awake container(s) not placed here (being removed)` }));
    return el("div", { className: `node-card ${node.alive ? "alive" : "lost"}`, "data-node": node.id },
      el("div", { className: "node-title" }, el("span", { className: "dot" }), el("span", { text: node.id }),
        node.alive ? null : badge("lost")),
      el("div", { className: "node-meta", text: `${where} · ${use}` }),
      el("ul", { className: "instances" }, ...rows));
  }));
}

function renderEvents(data) {
  const box = document.getElementById("events");
  if (!data.events.length) {
    box.replaceChildren(el("li", { className: "empty", text: "No lifecycle events in the last hour." }));
    return;
  }
  box.replaceChildren(...data.events.map((e) => {
    const detail = [];
    if (e.exit_code != null) detail.push(`exit ${e.exit_code}`);
    if (e.signal != null) detail.push(`signal ${e.signal}`);
    if (e.reason) detail.push(e.reason);
    return el("li", { "data-kind": e.kind },
      el("time", { text: fmt.time(e.time) }), el("span", {}, badge(e.kind)),
      el("span", { className: "what" }, `${e.class_name}/${e.name}`,
        el("span", { className: "where", text: ` on ${e.node_id}${detail.length ? " · " + detail.join(", ") : ""}` })));
  }));
}

function setStatus(state, text) {
  document.getElementById("status").dataset.state = state;
  document.getElementById("status-text").textContent = text;
}

async function poll(layer) {
  try {
    const resp = await fetch("/api/cluster", { cache: "no-store" });
    // The token was revoked or expired: the page itself now answers with the login form.
    if (resp.status === 401) return location.reload();
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const data = await resp.json();
    renderSummary(data);
    renderMap(layer, data);
    renderPools(data);
    renderNodes(data);
    renderEvents(data);
    setStatus("live", `live · ${fmt.time(data.time)}`);
  } catch (err) {
    setStatus("down", `control plane unreachable (${err.message}); retrying`);
  }
  setTimeout(() => poll(layer), POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  poll(drawWorld(document.getElementById("map")));
});
