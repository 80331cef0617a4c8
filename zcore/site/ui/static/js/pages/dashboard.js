// Dashboard: every VPG with its state and figures (its open alerts beside its state: the
// site's own verdicts on RPO and history SLAs), this site's pairing, open alerts.

import { enc, get } from "../api.js";
import { badge, bytes, duration, fill, h, rate, replace, stateBadge, table, time } from "../dom.js";

function vpgRow(vpg, st, alerts) {
  const s = st || {};
  const rpoLimit = vpg.settings && vpg.settings.rpo_alert_seconds;
  const rpoOver = s.rpo_seconds !== null && s.rpo_seconds !== undefined && rpoLimit && s.rpo_seconds > rpoLimit;
  return h("tr", { dataset: { vpg: vpg.name } },
    h("td", {}, h("a", { href: `#/vpg/${enc(vpg.name)}` }, vpg.name)),
    h("td", {}, vpg.role),
    h("td", {}, stateBadge(s.state || vpg.state),
      s.operation_state && s.operation_state !== "replicating" ? [" ", stateBadge(s.operation_state)] : null,
      s.sync_progress !== null && s.sync_progress !== undefined
        ? [" ", badge(`sync ${(s.sync_progress * 100).toFixed(0)}%`, "warn")] : null,
      alerts.map((a) => [" ", badge(a.code.replace(/_/g, " "), "bad")])),
    h("td", { class: rpoOver ? "over" : "" }, duration(s.rpo_seconds),
      rpoOver ? " (over its SLA)" : null),
    h("td", {},
      `${duration(s.history_seconds_held)} / ${duration(s.history_seconds_configured)}`),
    h("td", {}, `${bytes(s.journal_bytes)} / ${s.journal_limit_bytes ? bytes(s.journal_limit_bytes) : "no limit"}`),
    h("td", {}, rate(s.throughput_bytes_per_s)));
}

export async function dashboardPage(root) {
  document.title = "Dashboard · zcore";
  const body = h("tbody", {});
  const sites = h("div", {});
  const alerts = h("div", {});
  replace(root,
    h("h1", {}, "Dashboard"),
    h("section", { class: "card", "aria-labelledby": "vpgs-h" },
      h("h2", { id: "vpgs-h" }, "Virtual protection groups"),
      table("vpg-table", ["VPG", "Role", "State", "RPO", "History held / configured",
        "Journal used / limit", "Throughput"], body)),
    h("div", { class: "grid two" },
      h("section", { class: "card", "aria-labelledby": "pair-h" }, h("h2", { id: "pair-h" }, "Site and pairing"), sites),
      h("section", { class: "card", "aria-labelledby": "alerts-h" }, h("h2", { id: "alerts-h" }, "Open alerts"), alerts)));

  async function refresh() {
    const [vpgs, statuses, site, open] = await Promise.all([get("/vpgs"), get("/status/vpgs"),
      get("/sites"), get("/alerts", { active: true, limit: 200 })]);
    const byName = new Map(statuses.map((s) => [s.name, s]));
    fill(body, vpgs.length ? vpgs.map((v) => vpgRow(v, byName.get(v.name),
      open.filter((a) => a.vpg === v.name)))
      : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No VPG yet: ",
        h("a", { href: "#/create" }, "create one"), ".")));
    replace(sites,
      h("p", {}, "This site: ", h("strong", {}, site.site.name), h("span", { class: "muted" }, ` (${site.site.id})`)),
      site.peers.length
        ? h("ul", {}, site.peers.map((p) => h("li", {}, badge("paired", "ok"), " ", h("strong", {}, p.name),
          p.address ? ` at ${p.address}` : "", `, since ${time(p.paired_at)}`)))
        : h("p", { class: "muted" }, "Not paired with any site (`zcore site pair`)."));
    replace(alerts, open.length
      ? h("ul", {}, open.slice(0, 20).map((a) => h("li", {}, badge(a.severity, a.severity === "info" ? "" : "bad"), " ",
        a.vpg ? `${a.vpg}: ` : "", a.text, h("small", { class: "muted" }, ` ${time(a.time)}`))))
      : h("p", { class: "muted" }, "No open alert."),
    h("a", { href: "#/alerts" }, "All alerts and events"));
  }
  await refresh();
  return { refresh };
}
