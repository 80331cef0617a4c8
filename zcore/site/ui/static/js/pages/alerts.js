// Alerts and events: filtered by VPG, severity and state; alerts acknowledged here.

import { enc, get, post } from "../api.js";
import { badge, field, fill, h, messageBox, replace, select, table, time } from "../dom.js";

export async function alertsPage(root) {
  document.title = "Alerts and events · zcore";
  const box = messageBox();
  const vpgs = await get("/vpgs");
  const vpg = select([["", "Every VPG"], ...vpgs.map((v) => [v.name, v.name])], "");
  const active = select([["true", "Open"], ["", "All"]], "true");
  const severity = select([["", "Every severity"], ["info", "info"], ["warning", "warning"], ["error", "error"],
    ["critical", "critical"]], "");
  const alerts = h("tbody", {});
  const events = h("tbody", {});
  const more = h("div", {});
  let cursor = null;

  const filters = () => ({ vpg: vpg.value || undefined });
  async function ack(a) {
    try {
      await post(`/alerts/${enc(a.id)}/acknowledge`);
      box.show("ok", `Alert ${a.id} acknowledged.`);
      await refresh();
    } catch (err) { box.error(err); }
  }
  function eventRows(items) {
    return items.map((e) => h("tr", {}, h("td", {}, time(e.time)), h("td", {}, e.vpg || "–"),
      h("td", {}, badge(e.severity, e.severity === "info" ? "" : "bad")), h("td", {}, e.code),
      h("td", { class: "wrap" }, e.text)));
  }
  async function moreEvents() {
    const page = await get("/events", { ...filters(), severity: severity.value || undefined, cursor, limit: 50 });
    fill(events, [...events.rows, ...eventRows(page.items)]);
    cursor = page.next_cursor;
    replace(more, cursor ? h("button", { type: "button", onclick: () => moreEvents().catch((err) => box.error(err)) }, "Older events") : null);
  }
  async function refresh() {
    const list = await get("/alerts", { ...filters(), active: active.value || undefined, limit: 200 });
    fill(alerts, list.length ? list.map((a) => h("tr", { dataset: { alert: a.id } },
      h("td", {}, time(a.time)), h("td", {}, a.vpg || "–"), h("td", {}, badge(a.severity, a.severity === "info" ? "" : "bad")),
      h("td", { class: "wrap" }, a.text),
      h("td", {}, a.cleared ? "cleared" : "open", a.acknowledged ? ", acknowledged" : ""),
      h("td", {}, a.acknowledged ? "" : h("button", { type: "button", onclick: () => ack(a), "aria-label": `Acknowledge alert ${a.id}` }, "Acknowledge"))))
      : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No alert.")));
  }
  async function reload() {
    cursor = null;
    replace(events);
    await Promise.all([refresh(), moreEvents()]);
  }
  const onchange = () => reload().catch((err) => box.error(err));
  for (const c of [vpg, active, severity]) c.addEventListener("change", onchange);
  replace(root, h("h1", {}, "Alerts and events"),
    h("form", { class: "card row", onsubmit: (ev) => ev.preventDefault() },
      field("VPG", vpg), field("Alerts", active), field("Event severity", severity)),
    box,
    h("section", { class: "card", "aria-labelledby": "al-h" }, h("h2", { id: "al-h" }, "Alerts"),
      table("alert-table", ["Time", "VPG", "Severity", "Alert", "State", ""], alerts)),
    h("section", { class: "card", "aria-labelledby": "evt-h" }, h("h2", { id: "evt-h" }, "Events"),
      table("event-table", ["Time", "VPG", "Severity", "Code", "Event"], events), more));
  await reload();
  return { refresh };
}
