// Budget searches: the list, and one search drawn as a scatter plot of accuracy against
// latency (SVG built node by node) with the Pareto set joined and the best within budget
// marked, above the table of every trial. Refreshed while the search runs.

import { api, listAll } from "./api.js";
import { DASH, fmtAge, fmtBytes, fmtCount, fmtNum, fmtPct, h, statusBadge } from "./dom.js";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const ENDED = ["succeeded", "failed", "cancelled"];

function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function studentText(student) {
  if (!student || !student.preset) return "student";
  const size = [student.width, student.depth].filter((v) => v).join("×");
  return size ? `${student.preset} ${size}` : student.preset;
}

function ended(search) {
  return search.jobs.filter((j) => ENDED.includes(j.status)).length;
}

// --- the list --------------------------------------------------------------------------------

export async function renderSearches(view, { signal }) {
  const body = h("tbody");
  view.replaceChildren(
    h("div.heading", {}, h("h1", {}, "Searches")),
    h("p.muted", {}, "Budget searches: candidate students trained as jobs, the best within budget marked. Start one with POST /v1/searches or `distill searches submit`."),
    h(
      "table.searches",
      { id: "searches-table" },
      h("thead", {}, h("tr", {}, ...["Search", "Status", "Trials", "Best", "Created"].map((t) => h("th", {}, t)))),
      body,
    ),
  );
  while (!signal.aborted) {
    const searches = await listAll("/v1/searches", 5);
    body.replaceChildren(
      ...searches.map((search) =>
        h(
          "tr",
          { dataset: { searchId: search.id, status: search.status } },
          h("td", {}, h("a", { href: `/searches/${search.id}`, "data-link": true }, search.name || search.id)),
          h("td", {}, statusBadge(search.status)),
          h("td.num", {}, `${ended(search)}/${search.jobs.length}`),
          h("td", {}, (search.result && search.result.best_job_id) || DASH),
          h("td", { title: search.created_at }, fmtAge(search.created_at)),
        ),
      ),
    );
    if (!searches.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 5 }, h("span.muted", {}, "No searches yet."))));
    if (!searches.some((x) => !ENDED.includes(x.status))) return;
    await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
  }
}

// --- one search ------------------------------------------------------------------------------

/** The scatter plot: accuracy (or the trial's score) against latency, the budget as a line. */
export function scatter(result) {
  const width = 640;
  const height = 360;
  const pad = { left: 60, right: 20, top: 20, bottom: 48 };
  const points = (result.trials || []).filter((t) => t.score !== null && t.latency_ms !== null);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "scatter", id: "search-scatter" });
  svg.dataset.points = String(points.length);
  svg.append(s("title", {}, "Accuracy against latency: every trial, the Pareto set joined, the best within budget marked"));
  if (!points.length) return svg;
  const budget = (result.budget || {}).max_latency_ms;
  const xs = points.map((t) => t.latency_ms).concat(budget ? [budget] : []);
  const ys = points.map((t) => t.score);
  const [x0, x1] = [0, Math.max(...xs) * 1.1 || 1];
  const spread = Math.max(...ys) - Math.min(...ys) || 0.1;
  const [y0, y1] = [Math.min(...ys) - 0.1 * spread, Math.max(...ys) + 0.1 * spread];
  const X = (v) => pad.left + ((v - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (v) => height - pad.bottom - ((v - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  // Axes with a few ticks.
  svg.append(s("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom, stroke: "#9ca3af" }));
  svg.append(s("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, stroke: "#9ca3af" }));
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + ((x1 - x0) * i) / 4;
    const yv = y0 + ((y1 - y0) * i) / 4;
    svg.append(s("text", { x: X(xv), y: height - pad.bottom + 16, "text-anchor": "middle", "font-size": 11, fill: "#4b5563" }, fmtNum(xv, 2)));
    svg.append(s("text", { x: pad.left - 6, y: Y(yv) + 4, "text-anchor": "end", "font-size": 11, fill: "#4b5563" }, fmtNum(yv, 3)));
  }
  const metric = (points[0] && points[0].metric) || "accuracy";
  svg.append(s("text", { x: (pad.left + width - pad.right) / 2, y: height - 8, "text-anchor": "middle", "font-size": 12 }, "latency ms (batch 1, worker CPU)"));
  svg.append(s("text", { x: 14, y: (pad.top + height - pad.bottom) / 2, "text-anchor": "middle", "font-size": 12, transform: `rotate(-90 14 ${(pad.top + height - pad.bottom) / 2})` }, metric));
  if (budget) {
    svg.append(s("line", { x1: X(budget), y1: pad.top, x2: X(budget), y2: height - pad.bottom, stroke: "#dc2626", "stroke-dasharray": "6 4", class: "budget" }));
    svg.append(s("text", { x: X(budget) + 4, y: pad.top + 12, "font-size": 11, fill: "#dc2626" }, `budget ${budget} ms`));
  }
  // The Pareto set as a step line, fastest first.
  const front = points.filter((t) => t.pareto).sort((a, b) => a.latency_ms - b.latency_ms);
  if (front.length > 1) {
    const path = front.map((t, i) => `${i ? "L" : "M"}${X(t.latency_ms).toFixed(1)},${Y(t.score).toFixed(1)}`).join(" ");
    svg.append(s("path", { d: path, fill: "none", stroke: "#2563eb", "stroke-width": 1.5, class: "pareto-line" }));
  }
  for (const t of points) {
    const cls = t.best ? "point best" : t.pareto ? "point pareto" : "point";
    const fill = t.best ? "#f59e0b" : t.pareto ? "#2563eb" : "#9ca3af";
    const dot = s("circle", { cx: X(t.latency_ms), cy: Y(t.score), r: t.best ? 8 : 5, fill, stroke: t.best ? "#92400e" : "none", "stroke-width": 2, class: cls, "data-job-id": t.job_id });
    dot.append(s("title", {}, `${studentText(t.student)} ${t.method || ""}: ${fmtPct(t.accuracy)} at ${fmtNum(t.latency_ms)} ms${t.best ? " (best within budget)" : t.pareto ? " (Pareto)" : ""}`));
    svg.append(dot);
    if (t.best) svg.append(s("text", { x: X(t.latency_ms) + 11, y: Y(t.score) - 8, "font-size": 12, "font-weight": 700, fill: "#92400e" }, "★ best"));
  }
  return svg;
}

function trialsTable(result) {
  const trials = [...(result.trials || [])].sort((a, b) => (a.latency_ms ?? Infinity) - (b.latency_ms ?? Infinity));
  return h(
    "table.trials",
    { id: "trials-table" },
    h("thead", {}, h("tr", {}, ...["", "Job", "Student", "Method", "Accuracy", "Latency ms", "Parameters", "Size", "In budget", "Baseline"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      ...trials.map((t) =>
        h(
          "tr",
          { dataset: { jobId: t.job_id, pareto: String(Boolean(t.pareto)), best: String(Boolean(t.best)) } },
          h("td", {}, t.best ? "★" : t.pareto ? "●" : ""),
          h("td", {}, h("a", { href: `/jobs/${t.job_id}`, "data-link": true }, t.job_id)),
          h("td", {}, studentText(t.student)),
          h("td", {}, t.method || DASH),
          h("td.num", {}, t.accuracy !== null ? fmtPct(t.accuracy) : t.error || t.status),
          h("td.num", {}, fmtNum(t.latency_ms)),
          h("td.num", {}, fmtCount(t.parameters)),
          h("td.num", {}, fmtBytes(t.size_bytes)),
          h("td", {}, t.within_budget ? "yes" : "no"),
          h("td.num", {}, fmtPct(t.baseline_accuracy)),
        ),
      ),
    ),
  );
}

function budgetText(budget) {
  const parts = Object.entries(budget || {}).filter(([, v]) => v !== null && v !== undefined);
  return parts.length ? parts.map(([k, v]) => `${k} ${v}`).join(", ") : "none";
}

export async function renderSearch(view, { signal, params }) {
  while (!signal.aborted) {
    const search = await api(`/v1/searches/${params.id}`, { signal });
    const heading = h(
      "div.heading",
      {},
      h("h1", {}, search.name || search.id),
      statusBadge(search.status),
      ENDED.includes(search.status)
        ? null
        : h("button", { type: "button", onclick: () => api(`/v1/searches/${search.id}/cancel`, { method: "POST" }) }, "Cancel"),
    );
    const parts = [heading, h("p.muted", {}, `budget: ${budgetText((search.request || {}).budget)} · ${ended(search)}/${search.jobs.length} trials ended`)];
    if (search.result) {
      const best = search.result.best_job_id;
      parts.push(
        best
          ? h("p.best", { id: "search-best" }, "★ Best within budget: ", h("a", { href: `/jobs/${best}`, "data-link": true }, best))
          : h("p.error", { id: "search-best" }, search.result.message || "no trial met the budget"),
        h("div.chart", {}, scatter(search.result)),
        h("p.muted.small", {}, "Grey: a trial; blue: the Pareto set (no other trial is as accurate, as fast and as small); amber: the best within budget."),
        trialsTable(search.result),
      );
    } else {
      parts.push(
        h(
          "table.trials",
          { id: "trials-table" },
          h("thead", {}, h("tr", {}, h("th", {}, "Job"), h("th", {}, "Student"), h("th", {}, "Method"), h("th", {}, "Status"))),
          h("tbody", {}, ...search.jobs.map((j) => h("tr", {}, h("td", {}, h("a", { href: `/jobs/${j.id}`, "data-link": true }, j.id)), h("td", {}, studentText(j.student)), h("td", {}, j.method || DASH), h("td", {}, statusBadge(j.status))))),
        ),
      );
    }
    if (search.error) parts.push(h("p.error", {}, search.error.message));
    view.replaceChildren(...parts);
    if (ENDED.includes(search.status)) return;
    await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
  }
}
