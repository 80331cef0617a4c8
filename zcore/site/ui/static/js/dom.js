// Building the page: elements from data (text only, never markup), formatting of sizes,
// durations and times, and the message box every action reports into.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let ids = 0;
export function uid(prefix) { ids += 1; return `${prefix}-${ids}`; }

// A labelled control: the label names it, the hint says its range.
export function field(label, control, hint) {
  if (!control.id) control.id = uid("f");
  const inline = control.type === "checkbox";
  return h("div", { class: inline ? "field inline" : "field" },
    inline ? [control, h("label", { for: control.id }, label)]
      : [h("label", { for: control.id }, label), control],
    hint ? h("small", {}, hint) : null);
}

export function select(options, value) {
  return h("select", {}, options.map(([v, text]) =>
    h("option", { value: v, selected: String(v) === String(value) }, text)));
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function rate(n) { return n === null || n === undefined ? "–" : `${bytes(n)}/s`; }

export function duration(s) {
  if (s === null || s === undefined) return "–";
  const v = Number(s);
  if (v < 1) return `${v.toFixed(2)} s`;
  if (v < 120) return `${v.toFixed(v < 10 ? 1 : 0)} s`;
  if (v < 7200) return `${(v / 60).toFixed(1)} min`;
  if (v < 172800) return `${(v / 3600).toFixed(1)} h`;
  return `${(v / 86400).toFixed(1)} d`;
}

export function time(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return new Date(seconds * 1000).toLocaleString();
}

export function nsTime(ns) { return time(Number(ns) / 1e9); }

// An action's outcome: a status region that screen readers announce.
export function messageBox() {
  const box = h("div", { role: "status", "aria-live": "polite" });
  box.show = (kind, text) => replace(box, text ? h("div", { class: `message ${kind}` }, text) : null);
  box.error = (err) => box.show("error", err && err.code
    ? `Refused (${err.status} ${err.code}): ${err.message}` : String(err));
  box.clear = () => replace(box);
  return box;
}

export function badge(text, kind) { return h("span", { class: `badge ${kind || ""}` }, text); }

export function stateBadge(state) {
  const kinds = { protecting: "ok", replicating: "ok", syncing: "warn", creating: "warn",
    paused: "warn", testing: "warn", failing_over: "warn", failed_over: "bad", error: "bad",
    deleting: "warn", moved: "", committed: "", mirroring: "ok", tracking: "bad" };
  return badge(state || "–", kinds[state] || "");
}

// A table that becomes one card per row at phone width (app.css): each cell carries its
// column's name.  `fill(body, rows)` replaces the rows of a table `table` made.
export function table(id, headers, body) {
  body.columns = headers;
  return h("div", { class: "scroll" }, h("table", { id, class: "cards" },
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))), body));
}

export function fill(body, rows) {
  replace(body, rows);
  for (const tr of body.rows) {
    [...tr.cells].forEach((td, i) => {
      if (body.columns && body.columns[i] && td.colSpan === 1) td.dataset.label = body.columns[i];
    });
  }
  return body;
}
