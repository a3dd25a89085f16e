// manydoors dashboard: reads /api/stream (server-sent events, one stats snapshot a
// second), derives rates from successive snapshots, draws them with uPlot.
"use strict";

const KEEP = 300; // samples on the charts: five minutes at one a second
const COLORS = ["#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777", "#65a30d"];
const REFUSED_COLORS = ["#dc2626", "#f59e0b", "#7c2d12", "#be185d"];

// Axis steps for bytes: round numbers of B, KiB, MiB.
const BYTE_STEPS = [1, 1024, 1048576].flatMap((u) => [1, 2, 5, 10, 20, 50, 100, 200, 500].map((n) => n * u));

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const fmt1 = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
const fmt2 = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });

function num(v) { return v == null ? "–" : fmt.format(v); }
function rate(v) { return v == null ? "–" : (v >= 100 ? fmt : v >= 10 ? fmt1 : fmt2).format(v); }
function bytes(v) {
  if (v == null || !isFinite(v)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? fmt : fmt1).format(v) + " " + units[i];
}
function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// --- charts -------------------------------------------------------------------------

class Chart {
  constructor(container, series, opts) {
    this.container = container;
    this.series = series; // [{label, stroke}]
    this.data = [[], ...series.map(() => [])];
    this.plot = new uPlot(
      {
        width: Math.max(container.clientWidth, 300),
        height: 200,
        cursor: { drag: { x: false, y: false } },
        legend: { live: false },
        scales: {
          // At least 30 s wide from the start, so a new page scrolls like an old one.
          x: { time: true, range: (u, min, max) => [Math.min(min, max - 30), max] },
          y: { range: (u, min, max) => [0, Math.max(max * 1.1, opts.minMax || 1)] },
        },
        axes: [
          {},
          { size: 72, incrs: opts.incrs, values: (u, vals) => vals.map(opts.format || rate) },
        ],
        series: [
          {},
          ...series.map((s) => ({
            label: s.label, stroke: s.stroke, width: s.width || 1.5,
            fill: s.fill, dash: s.dash, value: (u, v) => (opts.format || rate)(v),
          })),
        ],
      },
      this.data,
      container,
    );
    new ResizeObserver(() => {
      const w = Math.max(container.clientWidth, 300);
      if (w !== this.plot.width) this.plot.setSize({ width: w, height: 200 });
    }).observe(container);
  }

  push(t, values) {
    this.data[0].push(t);
    values.forEach((v, i) => this.data[i + 1].push(v));
    if (this.data[0].length > KEEP) this.data.forEach((col) => col.shift());
    this.plot.setData(this.data);
  }
}

let charts = null;
let shape = ""; // services and refusal reasons the charts were built for

function buildCharts(s) {
  for (const id of ["chart-connections", "chart-accepts", "chart-messages", "chart-dropped", "chart-memory"]) {
    $(id).replaceChildren();
  }
  const reasons = Object.keys(s.refused);
  charts = {
    connections: new Chart($("chart-connections"), [
      { label: "total", stroke: "#1d2330", width: 2, fill: "rgba(29,35,48,0.06)" },
      ...s.services.map((svc, i) => ({ label: svc.name, stroke: COLORS[i % COLORS.length] })),
    ], { format: num }),
    accepts: new Chart($("chart-accepts"), [
      { label: "accepted/s", stroke: "#16a34a", width: 2 },
      ...reasons.map((r, i) => ({ label: "refused " + r + "/s", stroke: REFUSED_COLORS[i % REFUSED_COLORS.length] })),
    ], {}),
    messages: new Chart($("chart-messages"), [
      { label: "in/s", stroke: "#2563eb", width: 2 },
      { label: "out/s", stroke: "#9333ea", width: 2 },
    ], {}),
    dropped: new Chart($("chart-dropped"), [
      { label: "dropped/s", stroke: "#dc2626", width: 2, fill: "rgba(220,38,38,0.08)" },
    ], {}),
    memory: new Chart($("chart-memory"), [
      { label: "bytes per connection", stroke: "#0891b2", width: 2 },
    ], { format: bytes, minMax: 1024, incrs: BYTE_STEPS }),
  };
  return reasons;
}

// --- state --------------------------------------------------------------------------

let prev = null;      // previous snapshot, for rates
let baseline = null;  // summed worker RSS at page load or at the last 0 connections
let reasons = [];

function rssSum(s) {
  let sum = 0;
  for (const svc of s.services) for (const w of svc.workers) sum += w.rss_bytes || 0;
  return sum;
}

function perSecond(cur, old, dt) {
  if (old == null || !(dt > 0)) return null;
  return Math.max(0, (cur - old) / dt);
}

function update(s) {
  const newShape = JSON.stringify([s.services.map((x) => x.name), Object.keys(s.refused)]);
  if (newShape !== shape) { reasons = buildCharts(s); shape = newShape; prev = null; }
  // A restarted server starts its counters again: do not draw a negative rate.
  if (prev && s.uptime_s < prev.uptime_s) prev = null;
  const dt = prev ? s.uptime_s - prev.uptime_s : 0;
  const p = prev || {};
  const acceptRate = perSecond(s.accepted, p.accepted, dt);
  const refusedRates = reasons.map((r) => perSecond(s.refused[r], p.refused && p.refused[r], dt));
  const refusedTotal = reasons.reduce((a, r) => a + s.refused[r], 0);
  const inRate = perSecond(s.messages_in, p.messages_in, dt);
  const outRate = perSecond(s.messages_out, p.messages_out, dt);
  const dropRate = perSecond(s.dropped, p.dropped, dt);

  const rss = rssSum(s);
  if (baseline === null || s.connections === 0) baseline = rss;
  const memPerConn = s.connections > 0 ? (rss - baseline) / s.connections : null;

  const t = Date.now() / 1000;
  charts.connections.push(t, [s.connections, ...s.services.map((svc) => svc.connections)]);
  charts.accepts.push(t, [acceptRate, ...refusedRates]);
  charts.messages.push(t, [inRate, outRate]);
  charts.dropped.push(t, [dropRate]);
  charts.memory.push(t, [memPerConn]);

  const capacity = s.services.reduce((a, svc) => a + svc.max_connections, 0);
  $("total-connections").textContent = num(s.connections);
  $("capacity").textContent = "of " + num(capacity) + " max";
  $("accept-rate").textContent = rate(acceptRate);
  $("accepted-total").textContent = num(s.accepted) + " accepted in all";
  $("refuse-rate").textContent = rate(refusedRates.reduce((a, v) => a + (v || 0), 0));
  $("refused-total").textContent = reasons.map((r) => r + " " + num(s.refused[r])).join(" · ");
  $("in-rate").textContent = rate(inRate);
  $("in-total").textContent = num(s.messages_in) + " in all";
  $("out-rate").textContent = rate(outRate);
  $("out-total").textContent = num(s.messages_out) + " in all";
  $("dropped-total").textContent = num(s.dropped);
  $("dropped-rate").textContent = rate(dropRate) + " / s now";
  $("mem-per-conn").textContent = memPerConn == null ? "–" : bytes(memPerConn);
  $("uptime").textContent = "up " + duration(s.uptime_s);
  const b = s.broker || {};
  $("broker").textContent = b.kind
    ? `broker: ${b.kind}` + (b.channels != null ? ` · ${num(b.channels)} channels · ${num(b.users)} users` : "")
    : "";

  renderFds(s);
  renderTable(s);
  prev = s;
}

function renderFds(s) {
  const rows = [];
  for (const svc of s.services) {
    for (const w of svc.workers) {
      const used = w.fds, limit = w.fd_limit;
      const share = used != null && limit ? used / limit : 0;
      const fill = el("div", { class: share >= 0.95 ? "full" : share >= 0.8 ? "hot" : "" });
      fill.style.width = (100 * Math.min(share, 1)).toFixed(1) + "%";
      fill.style.minWidth = used ? "2px" : "0";
      rows.push(el("div", { class: "fd-row", id: `fds-${svc.name}-${w.slot}` },
        el("span", {}, `${svc.name} #${w.slot}`),
        el("div", { class: "bar" }, fill),
        el("span", { class: "num" }, `${num(used)} / ${num(limit)}`)));
    }
  }
  $("fds").replaceChildren(...rows);
}

function renderTable(s) {
  const rows = [];
  for (const svc of s.services) {
    rows.push(el("tr", { class: "service" },
      el("td", {}, svc.name),
      el("td", {}, svc.protocol),
      el("td", {}, `${svc.host}:${svc.port}`),
      el("td", { class: "num" }, num(svc.connections)),
      el("td", { class: "num" }, num(svc.max_connections)),
      el("td", { class: "num" }, bytes(svc.workers.reduce((a, w) => a + (w.rss_bytes || 0), 0))),
      el("td", { class: "num" }, num(svc.workers.reduce((a, w) => a + w.restarts, 0)))));
    for (const w of svc.workers) {
      const down = w.pid == null;
      rows.push(el("tr", { id: `worker-${svc.name}-${w.slot}`, class: down ? "down-worker" : "" },
        el("td", { class: "slot" }, `worker #${w.slot}`),
        el("td", {}, ""),
        el("td", {}, down ? "down" : "pid " + w.pid),
        el("td", { class: "num" }, num(w.connections)),
        el("td", { class: "num" }, `${num(w.fds)} / ${num(w.fd_limit)} fds`),
        el("td", { class: "num" }, bytes(w.rss_bytes)),
        el("td", { class: "num" }, num(w.restarts))));
    }
  }
  $("workers").tBodies[0].replaceChildren(...rows);
}

// --- stream -------------------------------------------------------------------------

function connect() {
  const status = $("status");
  const source = new EventSource("api/stream");
  source.onopen = () => { status.textContent = "live"; status.className = "live"; };
  source.onerror = () => { status.textContent = "reconnecting"; status.className = "down"; };
  source.onmessage = (event) => update(JSON.parse(event.data));
}

connect();
