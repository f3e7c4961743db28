// The jobs table: status, progress, age, teacher → student size, accuracy; refreshed while any
// job is active.

import { api, listAll } from "./api.js";
import {
  ACTIVE,
  DASH,
  fmtAge,
  fmtBytes,
  fmtCount,
  fmtPct,
  h,
  progressBar,
  ratioPhrase,
  statusBadge,
} from "./dom.js";

const REFRESH_MS = 2000;

function teacherId(spec) {
  if (spec.teacher) return spec.teacher.model_id;
  return spec.teachers && spec.teachers.length ? spec.teachers[0].model_id : null;
}

function studentText(spec) {
  const stages = spec.stages && spec.stages.length ? spec.stages : null;
  const student = stages ? stages[stages.length - 1].student : spec.student;
  if (!student) return "student";
  if (student.preset) {
    const size = [student.width, student.depth].filter((v) => v).join("×");
    return size ? `${student.preset} ${size}` : student.preset;
  }
  if (student.shrink) return `shrink ${student.shrink}`;
  return student.model_id || "student";
}

function sizes(job, models) {
  const result = job.result || {};
  const model = models.get(teacherId(job.spec || {}));
  const teacher = result.teacher || (model && { parameters: model.parameters, size_bytes: model.size_bytes });
  const left = teacher ? `${fmtCount(teacher.parameters)} (${fmtBytes(teacher.size_bytes)})` : DASH;
  const student = result.student;
  const right = student
    ? `${fmtCount(student.parameters)} (${fmtBytes(student.size_bytes)})`
    : studentText(job.spec || {});
  const params = result.parameter_ratio ?? result.compression_ratio;
  const ratio = params ? ` · ${ratioPhrase(params)}` : "";
  return `${left} → ${right}${ratio}`;
}

function accuracy(job) {
  const student = (job.result && job.result.student) || null;
  if (student) {
    if (typeof student.accuracy === "number") return fmtPct(student.accuracy);
    if (typeof student.agreement === "number") return `${fmtPct(student.agreement)} agr.`;
    return DASH;
  }
  const metrics = job.metrics || {};
  if (typeof metrics.val_accuracy === "number") return `${fmtPct(metrics.val_accuracy)} (val)`;
  return DASH;
}

function epochText(job) {
  const p = job.progress || {};
  if (!p.epoch || !p.epochs) return "";
  const stage = p.stages > 1 ? `stage ${p.stage}/${p.stages}, ` : "";
  return `${stage}epoch ${p.epoch}/${p.epochs}`;
}

/** A succeeded job whose labels-only baseline beat the student is not a plain green success. */
function verdictMark(job) {
  if (!job.result || job.result.verdict !== "baseline_better") return null;
  return h("div.verdict-mark.small", { title: job.result.warning || "" }, "⚠ baseline better");
}

// A job without a name is called after what it does: "teacher name → student".
function title(job, models) {
  if (job.name) return job.name;
  const teacher = models.get(teacherId(job.spec || {}));
  return `${teacher ? teacher.name : "teacher"} → ${studentText(job.spec || {})}`;
}

function row(job, models) {
  const link = h("a.job-title", { href: `/jobs/${job.id}`, "data-link": true }, title(job, models));
  return h(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    h("td", {}, link, h("div.muted.small", {}, job.id)),
    h("td", {}, statusBadge(job.status), verdictMark(job)),
    h("td", {}, progressBar(job), h("div.muted.small", {}, epochText(job))),
    h("td", { title: job.created_at }, fmtAge(job.created_at)),
    h("td.sizes", {}, sizes(job, models)),
    h("td.num.accuracy", {}, accuracy(job)),
  );
}

export async function render(view, { signal }) {
  const body = h("tbody");
  const table = h(
    "table.jobs",
    { id: "jobs-table" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Job", "Status", "Progress", "Age", "Teacher → student (params, size)", "Accuracy"].map(
          (t) => h("th", {}, t),
        ),
      ),
    ),
    body,
  );
  const empty = h("p.muted", { hidden: true }, "No jobs yet. ", h("a", { href: "/jobs/new", "data-link": true }, "Start one"), ".");
  view.replaceChildren(
    h("div.heading", {}, h("h1", {}, "Jobs"), h("a.button", { href: "/jobs/new", "data-link": true }, "New job")),
    table,
    empty,
  );

  let models = new Map();
  let timer = null;
  async function refresh() {
    try {
      const [jobs, modelList] = await Promise.all([
        api("/v1/jobs?limit=100", { signal }),
        models.size ? Promise.resolve(null) : listAll("/v1/models"),
      ]);
      if (modelList) models = new Map(modelList.map((m) => [m.id, m]));
      body.replaceChildren(...jobs.data.map((job) => row(job, models)));
      empty.hidden = jobs.data.length > 0;
      table.dataset.loaded = "true";
      if (jobs.data.some((job) => ACTIVE.has(job.status)) && !signal.aborted) {
        timer = setTimeout(refresh, REFRESH_MS);
      }
    } catch (error) {
      if (!signal.aborted) view.append(h("p.error", {}, error.message));
    }
  }
  signal.addEventListener("abort", () => clearTimeout(timer));
  await refresh();
}
