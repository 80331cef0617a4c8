// Create VPG: pick VMs (their volumes shown) and a paired site, settings with the API's
// ranges and defaults; the initial sync is a task followed here.  A VM can be added too,
// with an image file or as a running QEMU's disk.

import { enc, follow, get, model, post } from "../api.js";
import { bytes, field, h, messageBox, replace, select } from "../dom.js";
import { settingsFields } from "../forms.js";

function addVmForm(onAdded) {
  const box = messageBox();
  const name = h("input", { type: "text", name: "vm-name", required: true, maxlength: 128 });
  const vol = h("input", { type: "text", name: "volume-name", value: "disk0", required: true });
  const size = h("input", { type: "number", name: "volume-mib", min: 1, step: 1, value: 64, required: true });
  const path = h("input", { type: "text", name: "volume-path", maxlength: 4096 });
  return h("form", { id: "vm-form", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const vm = await post("/vms", { name: name.value, volumes: [{ name: vol.value,
        size: parseInt(size.value, 10) * 1048576, path: path.value || null }] });
      box.show("ok", `VM ${vm.name} added.`);
      onAdded();
    } catch (err) { box.error(err); }
  } }, h("fieldset", {}, h("legend", {}, "Add a VM with one volume"),
    h("div", { class: "row" }, field("VM name", name), field("Volume name", vol),
      field("Size (MiB)", size), field("Backing file", path, "empty: the site's own"))),
  h("button", { type: "submit" }, "Add VM"), box);
}

// A VM running in QEMU on this site's host, its disk protected in place: the site asks
// QEMU (its QMP socket) for the block node's size, or says why it cannot protect it.
function addQemuVmForm(onAdded) {
  const box = messageBox();
  const name = h("input", { type: "text", name: "qemu-vm-name", required: true, maxlength: 128 });
  const qmp = h("input", { type: "text", name: "qemu-qmp", required: true, maxlength: 107,
    placeholder: "/run/qemu/vm.qmp" });
  const node = h("input", { type: "text", name: "qemu-node", required: true, maxlength: 128,
    placeholder: "drive-virtio-disk0" });
  const vol = h("input", { type: "text", name: "qemu-volume", maxlength: 128 });
  return h("form", { id: "qemu-vm-form", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const vm = await post("/vms", { name: name.value, volumes: [{ name: vol.value || node.value,
        qmp: qmp.value, node: node.value }] });
      box.show("ok", `VM ${vm.name} added: ${bytes(vm.volumes[0].size)} in QEMU.`);
      onAdded();
    } catch (err) { box.error(err); }
  } }, h("fieldset", {}, h("legend", {}, "Add a running QEMU VM (its disk stays in place)"),
    h("div", { class: "row" }, field("QEMU VM name", name), field("QMP socket", qmp),
      field("Block node", node), field("QEMU volume name", vol, "empty: the node's name"))),
  h("button", { type: "submit" }, "Add QEMU VM"), box);
}

export async function createPage(root) {
  document.title = "Create VPG · zcore";
  const vmBox = h("div", {});
  const box = messageBox();
  const progress = h("div", { role: "status", "aria-live": "polite" });
  const name = h("input", { type: "text", name: "vpg-name", required: true, maxlength: 128,
    pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]*" });
  const [sites, schema] = await Promise.all([get("/sites"), model("VpgSettings")]);
  const peer = select(sites.peers.map((p) => [p.site_id, `${p.name} (${p.address})`]), sites.peers[0] && sites.peers[0].site_id);
  const settings = settingsFields(schema, null, "Settings");
  let picks = [];

  async function loadVms() {
    const page = await get("/vms", { limit: 1000 });
    picks = page.items.map((vm) => ({ vm, box: h("input", { type: "checkbox", name: "vm", value: vm.name }) }));
    replace(vmBox, picks.length ? h("fieldset", {}, h("legend", {}, "VMs"), picks.map(({ vm, box: cb }) =>
      field(`${vm.name}: ${vm.volumes.map((v) => `${v.name} ${bytes(v.size)}`).join(", ") || "no volume"}`, cb)))
      : h("p", { class: "muted" }, "No VM yet: add one below."));
  }
  await loadVms();

  replace(root, h("h1", {}, "Create a VPG"),
    h("form", { class: "card", id: "create-form", onsubmit: async (ev) => {
      ev.preventDefault();
      box.clear();
      try {
        const task = await post("/vpgs", { name: name.value, vms: picks.filter((p) => p.box.checked).map((p) => p.vm.name),
          peer: peer.value || null, settings: settings.collect() });
        const last = await follow(task, (t) => replace(progress, h("progress", { max: 1, value: t.progress || 0,
          "aria-label": "initial sync" }), h("p", {}, `${t.kind}: ${t.state} ${t.message || ""}`)));
        if (last.state === "succeeded") {
          box.show("ok", `VPG ${name.value} created.`);
          replace(progress, h("a", { href: `#/vpg/${enc(name.value)}` }, `Open ${name.value}`));
        } else box.show("error", `${last.state}: ${last.error ? last.error.message : last.message}`);
      } catch (err) { box.error(err); }
    } },
    field("VPG name", name, "letters, digits, '.', '_' and '-'"),
    sites.peers.length ? field("Recovery site", peer) : h("p", { class: "message error" }, "Pair this site with a recovery site first."),
    vmBox, settings.element,
    h("button", { type: "submit", class: "primary" }, "Create VPG"), box, progress),
    h("section", { class: "card" }, addVmForm(() => loadVms().catch((err) => box.error(err)))),
    h("section", { class: "card" }, addQemuVmForm(() => loadVms().catch((err) => box.error(err)))));
  return null;
}
