// Checkpoint picker: a timeline of the VPG's checkpoints from the bucketed listing, zoomed
// from 30 days down to seconds, searched by tag and time, and the checkpoints of the window
// listed (automatic, tagged, not consistent), each a way into the operations.

import { enc, get, post } from "../api.js";
import { badge, field, fill, h, messageBox, nsTime, replace, table } from "../dom.js";

const SLOTS = 60;
const MIN_SPAN = 10;
const MAX_SPAN = 30 * 86400;
const PRESETS = [["30 days", 30 * 86400], ["7 days", 7 * 86400], ["1 day", 86400],
  ["6 hours", 6 * 3600], ["1 hour", 3600], ["10 minutes", 600], ["1 minute", 60], ["10 seconds", 10]];

function spanText(s) {
  if (s >= 86400) return `${(s / 86400).toFixed(s % 86400 ? 1 : 0)} d`;
  if (s >= 3600) return `${(s / 3600).toFixed(s % 3600 ? 1 : 0)} h`;
  if (s >= 60) return `${(s / 60).toFixed(s % 60 ? 1 : 0)} min`;
  return `${s.toFixed(s < 10 ? 1 : 0)} s`;
}

export async function checkpointsPage(root, [name]) {
  document.title = `Checkpoints of ${name} · zcore`;
  const base = `/vpgs/${enc(name)}`;
  const ops = `#/vpg/${enc(name)}/operations`;
  const view = { span: 3600, end: Date.now() / 1000, live: true, tag: "" };
  const timeline = h("div", { class: "timeline", id: "timeline", role: "group",
    "aria-label": "Checkpoints per time slot; choose a slot to zoom into it" });
  const axis = h("div", { class: "timeline-axis" });
  const caption = h("p", { class: "muted", "aria-live": "polite" });
  const list = h("tbody", {});
  const box = messageBox();
  const tagQ = h("input", { type: "search", name: "tag-search", maxlength: 200 });
  const timeQ = h("input", { type: "datetime-local", name: "time-search", step: 1 });
  const newTag = h("input", { type: "text", name: "new-tag", maxlength: 200, required: true });

  const set = (span, end, live) => {
    view.span = Math.min(MAX_SPAN, Math.max(MIN_SPAN, span));
    view.live = live;
    view.end = live ? Date.now() / 1000 : end;
    refresh().catch((err) => box.error(err));
  };
  const centre = () => view.end - view.span / 2;
  const btn = (label, fn, extra) => h("button", { type: "button", onclick: fn, ...(extra || {}) }, label);

  replace(root, h("h1", {}, `Checkpoints of ${name}`),
    h("p", {}, h("a", { href: `#/vpg/${enc(name)}` }, `Back to ${name}`)),
    h("section", { class: "card", "aria-labelledby": "tl-h" },
      h("h2", { id: "tl-h" }, "Timeline"),
      h("div", { class: "row", role: "toolbar", "aria-label": "Zoom" },
        PRESETS.map(([label, s]) => btn(label, () => set(s, 0, true), { "aria-label": `Show the last ${label}` }))),
      h("div", { class: "row" },
        btn("Earlier", () => set(view.span, view.end - view.span / 2, false)),
        btn("Later", () => { const e = view.end + view.span / 2; set(view.span, e, e >= Date.now() / 1000); }),
        btn("Zoom in", () => set(view.span / 4, centre() + view.span / 8, false)),
        btn("Zoom out", () => set(view.span * 4, centre() + view.span * 2, false))),
      caption, timeline, axis),
    h("section", { class: "card", "aria-labelledby": "search-h" },
      h("h2", { id: "search-h" }, "Search"),
      h("form", { class: "row", id: "search-form", onsubmit: (ev) => {
        ev.preventDefault();
        view.tag = tagQ.value.trim();
        if (timeQ.value) set(view.span, new Date(timeQ.value).getTime() / 1000 + view.span / 2, false);
        else if (view.tag) set(MAX_SPAN, 0, true);
        else refresh().catch((err) => box.error(err));
      } },
      field("Tag (exact)", tagQ), field("Around this time", timeQ),
      h("button", { type: "submit", class: "primary" }, "Search"),
      btn("Clear", () => { tagQ.value = ""; timeQ.value = ""; view.tag = ""; set(view.span, 0, true); }))),
    h("section", { class: "card", "aria-labelledby": "tag-h" },
      h("h2", { id: "tag-h" }, "Tag a checkpoint"),
      h("form", { class: "row", id: "tag-form", onsubmit: async (ev) => {
        ev.preventDefault();
        try {
          const cp = await post(`${base}/checkpoints`, { tag: newTag.value });
          box.show("ok", `Checkpoint ${cp.id} tagged "${cp.tag}".`);
          newTag.value = "";
        } catch (err) { box.error(err); }
      } }, field("Tag for a checkpoint taken now", newTag), h("button", { type: "submit" }, "Tag now"))),
    box,
    h("section", { class: "card", "aria-labelledby": "list-h" },
      h("h2", { id: "list-h" }, "Checkpoints in the window"),
      table("checkpoint-table", ["Id", "Time", "Kind", "Tag", "Consistency", "Use"], list)));

  async function refresh() {
    if (view.live) view.end = Date.now() / 1000;
    const start = view.end - view.span;
    const bucket = view.span / SLOTS;
    const filter = { start, end: view.end, tag: view.tag || undefined };
    const [buckets, page] = await Promise.all([
      get(`${base}/checkpoints/buckets`, { ...filter, bucket_seconds: bucket }),
      get(`${base}/checkpoints`, { ...filter, limit: 200, order: "newest" })]);
    const slots = new Array(SLOTS).fill(null);
    for (const b of buckets.buckets) {
      const i = Math.floor((b.start - start) / bucket + 1e-6);
      if (i >= 0 && i < SLOTS) slots[i] = b;
    }
    const most = Math.max(1, ...slots.map((b) => (b ? b.count : 0)));
    replace(timeline, slots.map((b, i) => {
      const from = start + i * bucket;
      const label = b ? `${b.count} checkpoints (${b.tagged} tagged) from ${new Date(from * 1000).toLocaleString()}`
        : `no checkpoint from ${new Date(from * 1000).toLocaleString()}`;
      const el = h("button", { type: "button", class: b ? (b.tagged ? "tagged" : "") : "empty",
        "aria-label": label, title: label, onclick: () => set(Math.max(bucket, MIN_SPAN), from + Math.max(bucket, MIN_SPAN), false) });
      el.style.height = b ? `${Math.max(6, (b.count / most) * 100)}%` : "100%";
      return el;
    }));
    replace(axis, h("span", {}, new Date(start * 1000).toLocaleString()),
      h("span", {}, new Date(view.end * 1000).toLocaleString()));
    const total = buckets.buckets.reduce((n, b) => n + b.count, 0);
    caption.textContent = `${spanText(view.span)} shown, ${total} checkpoints${view.tag ? ` tagged "${view.tag}"` : ""}` +
      `${view.live ? ", up to now" : ""}.`;
    fill(list, page.items.length ? page.items.map((c) => h("tr", { dataset: { id: c.id } },
      h("td", {}, String(c.id)), h("td", {}, nsTime(c.time_ns)),
      h("td", {}, c.kind === "tagged" ? badge("tagged", "tagged") : badge("automatic")),
      h("td", { class: "wrap" }, c.tag || ""),
      h("td", {}, c.consistent ? badge("consistent", "ok") : badge("not consistent", "bad")),
      h("td", {}, h("a", { href: `${ops}?checkpoint=${c.id}`, "aria-label": `Recover checkpoint ${c.id}` }, "Recover…"))))
      : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No checkpoint in this window.")));
  }
  try {
    await refresh();
  } catch (err) {  // e.g. a protected site, which holds no journal: say why, poll nothing
    replace(root, h("h1", {}, `Checkpoints of ${name}`), box,
      h("p", {}, h("a", { href: `#/vpg/${enc(name)}` }, `Back to ${name}`)));
    box.error(err);
    return null;
  }
  return { refresh: () => (view.live ? refresh() : Promise.resolve()) };
}
