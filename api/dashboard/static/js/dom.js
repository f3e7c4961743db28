// DOM building (text only, never innerHTML with data) and number formatting.

/** h("td.num", {title: "x"}, "text", child) → an element; class names after the dots. */
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag || "div");
  if (classes.length) node.className = classes.join(" ");
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const DASH = "–";

export function fmtCount(n) {
  if (n === null || n === undefined) return DASH;
  if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e7 ? 0 : 1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(n >= 1e4 ? 0 : 1)}k`;
  return String(n);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return DASH;
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmtPct(x) {
  return x === null || x === undefined ? DASH : `${(100 * x).toFixed(1)}%`;
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined) return DASH;
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return fmtCount(x);
  return Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(digits);
}

/** A teacher / student ratio as people say it: 12.3 → "12.3× smaller", 0.5 → "2× larger". */
export function ratioPhrase(ratio, smaller = "smaller", larger = "larger") {
  if (typeof ratio !== "number" || ratio <= 0) return DASH;
  return ratio >= 1 ? `${fmtNum(ratio)}× ${smaller}` : `${fmtNum(1 / ratio)}× ${larger}`;
}

export function fmtAge(iso) {
  if (!iso) return DASH;
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return DASH;
  if (seconds < 60) return `${Math.round(seconds)}s`;
  return `${Math.floor(seconds / 60)}m ${Math.round(seconds % 60)}s`;
}

export const ACTIVE = new Set(["queued", "running", "cancelling"]);

export function statusBadge(status) {
  return h(`span.badge.status-${status}`, { dataset: { status } }, status);
}

export function progressBar(job) {
  const fraction = Math.max(0, Math.min(1, (job.progress && job.progress.fraction) || 0));
  const fill = h("span.fill");
  fill.style.width = `${(100 * fraction).toFixed(1)}%`;
  return h(
    "span.progress",
    { title: `${(100 * fraction).toFixed(0)}%`, role: "progressbar", "aria-valuenow": fraction },
    fill,
  );
}
