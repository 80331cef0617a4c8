// The REST API as the pages see it: a session (login, logout), requests that carry the
// session's CSRF token, the API's error shape as ApiError, and a task followed to its end.
// The browser holds no token: the session cookie (HttpOnly) stands for it.

let csrf = null;
let onLoggedOut = () => {};

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export function whenLoggedOut(fn) { onLoggedOut = fn; }

async function parse(r) {
  const text = await r.text();
  let doc = null;
  try { doc = text ? JSON.parse(text) : null; } catch { doc = null; }
  if (!r.ok) {
    const e = (doc && doc.error) || {};
    throw new ApiError(r.status, e.code || `http_${r.status}`, e.message || r.statusText,
      e.details);
  }
  return doc;
}

export async function session() {
  const r = await fetch("/ui/session", { cache: "no-store", credentials: "same-origin" });
  const doc = await parse(r);
  csrf = doc.logged_in ? doc.csrf_token : null;
  return doc;
}

export async function login(token) {
  const r = await fetch("/ui/login", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }),
  });
  const doc = await parse(r);
  csrf = doc.csrf_token;
  return doc;
}

export async function logout() {
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin",
    headers: { "X-CSRF-Token": csrf || "" } });
  csrf = null;
}

function query(params) {
  if (!params) return "";
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(`/api/v1${path}`, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  try {
    return await parse(r);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) onLoggedOut();
    throw err;
  }
}

export const get = (path, params) => api("GET", path + query(params));
export const post = (path, body) => api("POST", path, body === undefined ? {} : body);
export const patch = (path, body) => api("PATCH", path, body);

export const enc = encodeURIComponent;

let schema = null;
// The API's own description of a request body (bounds, defaults): forms are built from it.
export async function model(name) {
  if (schema === null) schema = await get("/openapi.json");
  return schema.components.schemas[name];
}

// Follow a task until it ends; `update(task)` is called at each poll.
export async function follow(task, update, interval = 700) {
  let t = task;
  update(t);
  while (!["succeeded", "failed", "cancelled"].includes(t.state)) {
    await new Promise((ok) => setTimeout(ok, interval));
    t = await get(`/tasks/${enc(t.id)}`);
    update(t);
  }
  return t;
}
