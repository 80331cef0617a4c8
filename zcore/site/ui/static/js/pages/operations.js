// Operations: wizards for the failover test, failover, commit and rollback, move, reverse
// protection and failback.  Each starts a task through the API and shows its progress and
// result live; a state that forbids the operation shows the API's refusal and its reason.

import { enc, follow, get, post } from "../api.js";
import { field, h, messageBox, replace, select, stateBadge } from "../dom.js";

function checkpointChoice(preset) {
  const kind = select([["latest", "The latest checkpoint"], ["tagged", "The latest tagged checkpoint"],
    ["consistent", "The latest consistent checkpoint"], ["id", "This checkpoint id:"]], preset ? "id" : "latest");
  const id = h("input", { type: "number", min: 0, step: 1, value: preset || "" });
  const row = h("div", { class: "row" }, field("Checkpoint", kind), field("Checkpoint id", id));
  return {
    element: row,
    // the test and the failover spell their choices differently
    forTest: () => ({ latest: "latest", tagged: "latest-tagged", consistent: "latest-consistent",
      id: `id:${id.value}` })[kind.value],
    forFailover: () => ({ latest: "latest", tagged: "latest_tagged", consistent: "latest_consistent",
      id: parseInt(id.value, 10) })[kind.value],
  };
}

// A task's progress and outcome, shown as it runs.
function taskPanel() {
  const bar = h("progress", { max: 1, value: 0 });
  const text = h("p", {});
  const panel = h("div", { class: "task", role: "status", "aria-live": "polite", hidden: true }, bar, text);
  panel.track = async (task) => {
    panel.hidden = false;
    const last = await follow(task, (t) => {
      bar.value = t.progress || 0;
      bar.setAttribute("aria-label", `${t.kind} progress`);
      text.textContent = `${t.kind} ${t.id}: ${t.state}${t.message ? ` — ${t.message}` : ""}`;
    });
    const outcome = last.state === "succeeded" ? h("div", { class: "message ok" },
      `${last.kind} succeeded.${last.result ? ` Result: ${JSON.stringify(last.result)}` : ""}`)
      : h("div", { class: "message error" }, `${last.kind} ${last.state}: ${last.error ? `${last.error.code}: ${last.error.message}` : last.message}`);
    replace(panel, bar, text, outcome);
    return last;
  };
  return panel;
}

// A wizard: a form whose submit starts a task; refusals go to its message box.
function wizard(id, title, help, controls, buttons) {
  const box = messageBox();
  const panel = taskPanel();
  const run = async (start) => {
    box.clear();
    replace(panel);
    try {
      const task = await start();
      await panel.track(task);
    } catch (err) { box.error(err); }
  };
  return h("section", { class: "card", id, "aria-labelledby": `${id}-h` },
    h("h2", { id: `${id}-h` }, title), h("p", { class: "muted" }, help),
    h("form", { onsubmit: (ev) => ev.preventDefault() }, controls,
      h("div", { class: "row" }, buttons.map(([label, start, cls]) =>
        h("button", { type: "button", class: cls || "", onclick: () => run(start) }, label)))),
    box, panel);
}

export async function operationsPage(root, [name], query) {
  document.title = `Operations on ${name} · zcore`;
  const base = `/vpgs/${enc(name)}`;
  const vpg = await get(base);
  const preset = query.get("checkpoint");
  const state = h("div", {});

  const testCp = checkpointChoice(preset);
  const result = select([["passed", "Passed"], ["failed", "Failed"]], "passed");
  const note = h("input", { type: "text", maxlength: 2000 });
  const foCp = checkpointChoice(preset);
  const policy = select([["none", "Wait for me to commit or roll back"], ["commit", "Commit after a delay"],
    ["rollback", "Roll back after a delay"]], "none");
  const after = h("input", { type: "number", min: 0, step: "any", value: "" });
  const shutdown = select([["none", "Leave the protected VMs alone"], ["graceful", "Shut them down gracefully"],
    ["force", "Force them off"]], "none");
  const reverse = h("input", { type: "checkbox" });
  const moveReverse = h("input", { type: "checkbox", checked: true });

  replace(root, h("h1", {}, `Operations on ${name}`),
    h("p", {}, h("a", { href: `#/vpg/${enc(name)}` }, `Back to ${name}`), " · ",
      h("a", { href: `#/vpg/${enc(name)}/checkpoints` }, "Pick a checkpoint")),
    h("section", { class: "card", "aria-labelledby": "now-h" }, h("h2", { id: "now-h" }, "Now"), state),
    h("div", { class: "grid two" },
      wizard("test-wizard", "Failover test", "Start the VMs on a checkpoint beside replication, which goes on; stop with a verdict.",
        [testCp.element, h("div", { class: "row" }, field("Result", result), field("Note", note))],
        [["Start test", () => post(`${base}/test`, { checkpoint: testCp.forTest() }), "primary"],
          ["Stop test", () => post(`${base}/test/stop`, { result: result.value, note: note.value })]]),
      wizard("failover-wizard", "Failover", "Recover the VPG at this site from a checkpoint; then commit or roll back.",
        [foCp.element, field("Commit policy", policy), field("Minutes before the policy acts", after, "0: at once"),
          field("Protected VMs", shutdown), field("Reverse protection once committed", reverse)],
        [["Fail over", () => post(`${base}/failover`, { checkpoint: foCp.forFailover(), commit_policy: policy.value,
          commit_after_minutes: after.value === "" ? null : Number(after.value),
          shutdown_policy: shutdown.value, reverse: reverse.checked }), "danger"]]),
      wizard("commit-wizard", "Commit or roll back", "Commit keeps the recovered volumes; rollback discards them and replication goes on.",
        [], [["Commit", () => post(`${base}/failover/commit`), "primary"], ["Roll back", () => post(`${base}/failover/rollback`)]]),
      wizard("move-wizard", "Move", "A planned move, run at the protected site: writes stop, then failover and commit at the recovery site.",
        [field("Protect back to this site afterwards", moveReverse)],
        [["Move", () => post(`${base}/move`, { reverse: moveReverse.checked }), "danger"]]),
      wizard("reverse-wizard", "Reverse protection", "Protect a committed failover back to the original site (a delta sync).",
        [], [["Reverse", () => post(`${base}/reverse`)]]),
      wizard("failback-wizard", "Failback", "Fail a reversed VPG back to its original site.",
        [], [["Fail back", () => post(`${base}/failback`)]])));

  async function refresh() {
    const s = await get(`${base}/status`);
    const extra = [];
    if (vpg.role === "recovery") {
      const [fo, test] = await Promise.all([get(`${base}/failover`), get(`${base}/test`)]);
      if (fo.state) extra.push(h("p", { id: "failover-state" }, "Failover: ", stateBadge(fo.state),
        fo.checkpoint_id !== undefined ? ` at checkpoint ${fo.checkpoint_id}` : "",
        fo.exports && fo.exports.length ? `; served: ${fo.exports.join(", ")}` : ""));
      if (test.running) extra.push(h("p", { id: "test-state" }, "Failover test running at checkpoint ",
        String(test.running.checkpoint && test.running.checkpoint.id), "; exports: ",
        (test.running.exports || []).join(", ")));
    }
    replace(state, h("p", { id: "operation-state" }, "VPG ", stateBadge(s.state), " operation: ",
      stateBadge(s.operation_state || "–")), extra);
  }
  await refresh();
  return { refresh };
}
