// The dashboard shell: the API key field, a small path router and the notice line.

import { getKey, setKey } from "./api.js";
import { h } from "./dom.js";
import { renderNewJob, renderUploads } from "./forms.js";
import { render as renderJob } from "./job.js";
import { render as renderJobs } from "./jobs.js";
import { renderSearch, renderSearches } from "./search.js";

const ROUTES = [
  [/^\/$/, "jobs", renderJobs],
  [/^\/jobs\/new$/, "new", renderNewJob],
  [/^\/jobs\/(?<id>[^/]+)$/, "jobs", renderJob],
  [/^\/uploads$/, "uploads", renderUploads],
  [/^\/searches$/, "searches", renderSearches],
  [/^\/searches\/(?<id>[^/]+)$/, "searches", renderSearch],
];

const view = document.getElementById("view");
const notice = document.getElementById("notice");
let current = null;

function say(message) {
  notice.textContent = message;
  notice.hidden = !message;
}

async function show() {
  if (current) current.abort();
  current = new AbortController();
  const { signal } = current;
  say("");
  const path = location.pathname;
  const match = ROUTES.map(([re, nav, fn]) => [path.match(re), nav, fn]).find(([m]) => m);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", Boolean(match && link.dataset.nav === match[1]));
  }
  view.dataset.page = match ? match[1] : "missing";
  if (!match) {
    view.replaceChildren(h("h1", {}, "Not found"), h("p", {}, "No page here. ", h("a", { href: "/", "data-link": true }, "Back to the jobs"), "."));
    return;
  }
  view.replaceChildren(h("p.muted", {}, "Loading…"));
  try {
    await match[2](view, { signal, params: match[0].groups || {}, navigate });
  } catch (error) {
    if (!signal.aborted) view.replaceChildren(h("p.error", {}, error.message));
  }
}

export function navigate(path) {
  history.pushState(null, "", path);
  show();
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(link.getAttribute("href"));
});
window.addEventListener("popstate", show);

// --- the key ---------------------------------------------------------------------------------

const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
const keyState = document.getElementById("key-state");

function showKeyState() {
  keyState.textContent = getKey() ? "saved in this browser" : "";
}

keyInput.value = getKey();
showKeyState();
// With auth off (a local `distill serve`) there is no key to give: no key field.
fetch("/dashboard/config.json")
  .then((r) => (r.ok ? r.json() : null))
  .then((config) => {
    keyForm.hidden = Boolean(config && config.auth === "off");
  })
  .catch(() => {});
keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setKey(keyInput.value.trim());
  showKeyState();
  show();
});
window.addEventListener("distill:unauthorized", (event) => {
  say(`${event.detail} — paste an API key in the field at the top and press Save.`);
  keyInput.focus();
});

show();
