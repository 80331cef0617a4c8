// VPG detail: status, RPO and throughput over the last hour, history against its SLA,
// VMs and volumes, editable settings, actions and events.

import { enc, get, model, patch, post } from "../api.js";
import { holdBar, lineChart } from "../chart.js";
import { bytes, duration, field, h, messageBox, rate, replace, stateBadge, time } from "../dom.js";
import { settingsFields } from "../forms.js";

const HOUR = 3600;

function statusList(s) {
  const row = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
  return h("dl", { class: "kv" },
    row("State", [stateBadge(s.state), s.operation_state ? [" ", stateBadge(s.operation_state)] : null]),
    row("Role", s.role),
    row("RPO", duration(s.rpo_seconds)),
    row("Throughput", rate(s.throughput_bytes_per_s)),
    row("Journal", `${bytes(s.journal_bytes)} of ${s.journal_limit_bytes ? bytes(s.journal_limit_bytes) : "no limit"}`),
    s.sync_progress !== null && s.sync_progress !== undefined
      ? row("Sync", `${(s.sync_progress * 100).toFixed(0)}%, ${duration(s.sync_eta_seconds)} left`) : null,
    s.latest_checkpoint ? row("Latest checkpoint", `${s.latest_checkpoint.id} at ${time(s.latest_checkpoint.time_ns / 1e9)}`) : null,
    s.scratch_limit_bytes ? row("Test scratch", `${bytes(s.scratch_used_bytes)} of ${bytes(s.scratch_limit_bytes)}`) : null,
    (s.hypervisor_disks || []).map((d) => row(`Disk ${d.vm}/${d.volume}`,
      [stateBadge(d.state), ` QEMU node ${d.node}`, d.error ? h("span", { class: "muted" }, `: ${d.error}`) : null])));
}

async function vmList(vpg) {
  const vms = await Promise.all(vpg.vms.map((n) => get(`/vms/${enc(n)}`).catch(() => ({ name: n, volumes: null }))));
  if (!vms.length) return h("p", { class: "muted" }, "No VM.");
  return h("ul", {}, vms.map((vm) => h("li", {}, h("strong", {}, vm.name),
    vm.volumes === null ? h("span", { class: "muted" }, " (not in this site's inventory)")
      : h("ul", {}, vm.volumes.map((v) => h("li", {}, `${v.name}: ${bytes(v.size)}, ${v.role}`,
        v.path ? h("span", { class: "muted" }, ` at ${v.path}`) : null))))));
}

// A protected VPG's protection settings (PATCH /vpgs/NAME); a recovery VPG's recovery
// settings: adapter, scratch limit, test period (PATCH /vpgs/NAME/recovery-settings).
async function settingsForm(vpg, onSaved) {
  const box = messageBox();
  const recovery = vpg.role === "recovery";
  const base = `/vpgs/${enc(vpg.name)}`;
  const current = recovery ? await get(`${base}/recovery-settings`) : vpg.settings;
  const fields = settingsFields(await model(recovery ? "RecoverySettings" : "VpgSettingsPatch"),
    current, recovery ? "Recovery settings" : "Protection settings");
  // novalidate: the API judges the values, and its refusal says which and why
  return h("form", { id: "settings-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const changed = fields.collect();
      if (!Object.keys(changed).length) { box.show("info", "Nothing changed."); return; }
      if (recovery) await patch(`${base}/recovery-settings`, changed);
      else await patch(base, { settings: changed });
      box.show("ok", `Saved: ${Object.keys(changed).join(", ")}.`);
      onSaved();
    } catch (err) { box.error(err); }
  } }, fields.element, h("button", { type: "submit", class: "primary" }, "Save settings"), box);
}

function actions(vpg) {
  const box = messageBox();
  const tag = h("input", { type: "text", name: "tag", maxlength: 200, required: true });
  const act = (label, fn) => h("button", { type: "button", onclick: async () => {
    try { await fn(); } catch (err) { box.error(err); }
  } }, label);
  const base = `/vpgs/${enc(vpg.name)}`;
  return h("div", {},
    h("form", { id: "tag-form", class: "row", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const cp = await post(`${base}/checkpoints`, { tag: tag.value });
        box.show("ok", `Checkpoint ${cp.id} tagged "${cp.tag}".`);
        tag.value = "";
      } catch (err) { box.error(err); }
    } }, field("Tag a checkpoint now", tag), h("button", { type: "submit" }, "Tag")),
    h("div", { class: "row" },
      act("Pause", async () => { await post(`${base}/pause`); box.show("ok", "Paused."); }),
      act("Resume", async () => { await post(`${base}/resume`); box.show("ok", "Resumed."); }),
      h("a", { href: `#${base.replace("/vpgs/", "/vpg/")}/checkpoints` }, "Checkpoints"),
      h("a", { href: `#${base.replace("/vpgs/", "/vpg/")}/operations` }, "Operations")),
    box);
}

export async function vpgPage(root, [name]) {
  document.title = `${name} · zcore`;
  let vpg = await get(`/vpgs/${enc(name)}`);
  const status = h("div", {});
  const bars = h("div", {});
  const rpo = h("div", { id: "rpo-chart" });
  const thr = h("div", { id: "throughput-chart" });
  const events = h("div", {});
  const settings = h("div", {});
  const showSettings = async () => replace(settings, await settingsForm(vpg, async () => {
    vpg = await get(`/vpgs/${enc(name)}`);
  }));
  const card = (id, title, ...body) => h("section", { class: "card", "aria-labelledby": id },
    h("h2", { id }, title), body);
  replace(root, h("h1", {}, `VPG ${name}`),
    h("div", { class: "grid two" },
      card("st-h", "Status", status, bars),
      card("act-h", "Actions", actions(vpg))),
    h("div", { class: "grid two" },
      card("rpo-h", "RPO, last hour", rpo),
      card("thr-h", "Throughput, last hour", thr)),
    h("div", { class: "grid two" },
      card("vm-h", "VMs and volumes", await vmList(vpg)),
      card("set-h", "Settings", vpg.role === "recovery"
        ? h("p", { class: "muted" }, "How this site recovers the VPG; its protection settings are set at its protected site.") : null,
        settings)),
    card("ev-h", "Events", events));
  await showSettings();
  const throughputSeries = vpg.role === "protected" ? "throughput_out_bytes" : "throughput_in_bytes";

  async function refresh() {
    const end = Date.now() / 1000;
    const start = end - HOUR;
    const history = (series) => get("/metrics/history", { series, vpg: name, start, end })
      .then((m) => m.points).catch(() => []);
    const [s, rp, tp, ev] = await Promise.all([get(`/vpgs/${enc(name)}/status`),
      history("rpo_seconds"), history(throughputSeries), get("/events", { vpg: name, limit: 15 })]);
    replace(status, statusList(s));
    replace(bars,
      s.history_seconds_held === null || s.history_seconds_held === undefined ? null : holdBar("Journal history held against its SLA", s.history_seconds_held, s.history_seconds_configured, duration),
      s.journal_limit_bytes ? holdBar("Journal use against its limit", s.journal_bytes, s.journal_limit_bytes, bytes) : null);
    replace(rpo, lineChart({ title: "RPO", points: rp, start, end, format: duration,
      limit: vpg.settings.rpo_alert_seconds }));
    replace(thr, lineChart({ title: "Throughput", points: tp, start, end, format: rate }));
    replace(events, ev.items.length ? h("ul", {}, ev.items.map((e) => h("li", {},
      h("small", { class: "muted" }, `${time(e.time)} `), `${e.severity}: ${e.text}`)))
      : h("p", { class: "muted" }, "No event."));
  }
  await refresh();
  return { refresh };
}
