// The single page: log in, then a page per route of the URL's fragment, each refreshed
// every POLL_MS while it is shown (the dashboard's live view is this polling).

import { login, logout, session, whenLoggedOut } from "./api.js";
import { field, h, messageBox, replace } from "./dom.js";
import { alertsPage } from "./pages/alerts.js";
import { checkpointsPage } from "./pages/checkpoints.js";
import { createPage } from "./pages/create.js";
import { dashboardPage } from "./pages/dashboard.js";
import { operationsPage } from "./pages/operations.js";
import { vpgPage } from "./pages/vpg.js";

export const POLL_MS = 2000;

const main = document.getElementById("main");
const nav = document.getElementById("nav");

const ROUTES = [
  [/^\/?$/, dashboardPage],
  [/^\/create$/, createPage],
  [/^\/alerts$/, alertsPage],
  [/^\/vpg\/([^/]+)$/, vpgPage],
  [/^\/vpg\/([^/]+)\/checkpoints$/, checkpointsPage],
  [/^\/vpg\/([^/]+)\/operations$/, operationsPage],
];

let generation = 0;
let timer = null;

function stop() {
  generation += 1;
  if (timer !== null) clearTimeout(timer);
  timer = null;
}

function loginView(reason) {
  stop();
  nav.hidden = true;
  const input = h("input", { type: "password", name: "token", autocomplete: "off",
    required: true, spellcheck: "false" });
  const box = messageBox();
  if (reason) box.show("info", reason);
  const form = h("form", { class: "card login", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      await login(input.value.trim());
      input.value = "";
      await route();
    } catch (err) {
      box.show("error", err.status === 401 ? "That token is not valid on this site." : String(err.message || err));
    }
  } },
  h("h1", {}, "Log in to this zcore site"),
  field("API token", input, "`zcore site init` printed one; `zcore token create` makes more"),
  h("button", { type: "submit", class: "primary" }, "Log in"), box);
  replace(main, form);
  document.title = "Log in · zcore";
  input.focus();
}

async function route() {
  stop();
  delete main.dataset.ready;
  const mine = generation;
  let doc;
  try {
    doc = await session();
  } catch (err) {
    replace(main, h("div", { class: "message error" }, `The site did not answer: ${err.message}`));
    return;
  }
  if (!doc.logged_in) { loginView(); return; }
  nav.hidden = false;
  const [path, qs] = (location.hash.replace(/^#/, "") || "/").split("?");
  const query = new URLSearchParams(qs || "");
  for (const [pattern, page] of ROUTES) {
    const m = pattern.exec(path);
    if (!m) continue;
    const root = h("div", {});
    replace(main, root);
    const status = h("p", { class: "muted", role: "status" });
    let view;
    try {
      view = await page(root, m.slice(1).map(decodeURIComponent), query);
    } catch (err) {
      replace(root, h("div", { class: "message error" }, `This page could not load: ${err.message}`));
      return;
    }
    main.append(status);
    main.dataset.ready = path || "/";  // the page is drawn (tests wait for it)
    if (view && view.refresh) poll(view.refresh, mine, status);
    return;
  }
  replace(main, h("h1", {}, "No such page"), h("a", { href: "#/" }, "Back to the dashboard"));
}

function poll(refresh, mine, status) {
  const tick = async () => {
    if (mine !== generation) return;
    try {
      await refresh();
      status.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      status.textContent = `Update failed: ${err.message}`;
    }
    if (mine === generation) timer = setTimeout(tick, POLL_MS);
  };
  timer = setTimeout(tick, POLL_MS);
}

whenLoggedOut(() => loginView("Your session ended: log in again."));
document.getElementById("logout").addEventListener("click", async () => {
  await logout();
  loginView("Logged out.");
});
window.addEventListener("hashchange", () => { route().catch(() => {}); });
route().catch(() => {});
