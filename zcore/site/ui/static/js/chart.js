// Charts drawn as SVG from the API's figures: a line over time (the metric history) and a
// bar of what is held against what is wanted (journal history against its SLA).

import { h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// points: [[time_s, value], ...] oldest first; a window of [start, end] seconds.
// The window starts at the first point when the history is younger than the window; a
// limit far above the data is named rather than drawn (it would flatten the line).
export function lineChart({ title, points, start: windowStart, end, format, limit }) {
  const W = 600, H = 180, L = 56, R = 8, T = 10, B = 24;
  const values = points.map((p) => p[1]);
  const start = points.length ? Math.max(windowStart, Math.min(points[0][0] - 30, end - 120)) : windowStart;
  const highest = Math.max(1e-9, ...values);
  const drawLimit = limit && limit <= highest * 4;
  const top = Math.max(highest, drawLimit ? limit : 0) * 1.1;
  const x = (t) => L + ((t - start) / Math.max(1e-9, end - start)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const line = points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  const label = points.length
    ? `${title}: ${points.length} points, latest ${format(values[values.length - 1])}, highest ${format(Math.max(...values))}`
    : `${title}: no data yet`;
  return svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": label, "data-points": points.length },
  svg("title", {}, label),
  svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
  svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
  svg("text", { x: L - 4, y: T + 10, "text-anchor": "end" }, format(top)),
  svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, format(0)),
  svg("text", { x: L, y: H - 6 }, new Date(start * 1000).toLocaleTimeString()),
  svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, new Date(end * 1000).toLocaleTimeString()),
  drawLimit ? svg("line", { class: "limit", x1: L, y1: y(limit), x2: W - R, y2: y(limit) }) : null,
  limit && !drawLimit ? svg("text", { x: W - R, y: T + 10, "text-anchor": "end" }, `SLA ${format(limit)}, far above`) : null,
  points.length ? svg("polyline", { class: "line", points: line }) : null,
  points.length ? null : svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
}

// held against wanted, as a filled bar (short of it: the warning colour).
export function holdBar(label, held, wanted, format) {
  const share = wanted ? Math.min(1, (held || 0) / wanted) : 0;
  const fill = h("span", {});
  fill.style.width = `${(share * 100).toFixed(1)}%`;
  const text = `${label}: ${format(held)} of ${format(wanted)}`;
  return h("div", {},
    h("div", { class: share < 1 ? "bar short" : "bar", role: "meter", "aria-label": label,
      "aria-valuemin": 0, "aria-valuemax": wanted || 0, "aria-valuenow": held || 0,
      "aria-valuetext": text }, fill),
    h("small", { class: "muted" }, text));
}
