// One job: status and progress, live loss and accuracy curves (event history, then the live
// stream), the teacher / student / baseline table, artifact downloads and a cancel button.

import { api, download, eventHistory, streamEvents } from "./api.js";
import { Curves } from "./charts.js";
import {
  ACTIVE,
  DASH,
  fmtAge,
  fmtBytes,
  fmtDuration,
  fmtNum,
  fmtPct,
  h,
  progressBar,
  ratioPhrase,
  statusBadge,
} from "./dom.js";

const POLL_MS = 1500;
const ROWS = [
  ["accuracy", "Accuracy", fmtPct],
  ["f1_macro", "F1 (macro)", fmtPct],
  ["agreement", "Agreement with teacher", fmtPct],
  ["mse", "MSE to teacher", fmtNum],
  ["cosine", "Cosine to teacher", fmtNum],
  ["perplexity", "Perplexity", fmtNum],
  ["token_agreement", "Next-token agreement", fmtPct],
  ["kl_to_teacher", "KL to teacher", fmtNum],
  ["parameters", "Parameters", fmtNum],
  ["size_bytes", "Size", fmtBytes],
  ["latency_ms_p50", "Latency p50 (ms)", fmtNum],
  ["latency_ms_range", "Latency range over rounds (ms)", fmtRange],
  ["latency_ms_p50_onnx", "Latency p50, onnxruntime (ms)", fmtNum],
  ["throughput_per_s", "Throughput (/s)", fmtNum],
  ["throughput_per_s_onnx", "Throughput, onnxruntime (/s)", fmtNum],
  ["latency_ms_per_token", "Latency per token (ms, greedy)", fmtNum],
  ["tokens_per_s", "Tokens/s (greedy, batch 1)", fmtNum],
];
const VERDICTS = {
  distillation_helped: "Distillation helped: the student beats the labels-only baseline.",
  no_significant_difference: "No significant difference between the student and the labels-only baseline.",
  baseline_better: "The labels-only baseline is better than the distilled student.",
};

function fmtRange(range) {
  return Array.isArray(range) ? `${fmtNum(range[0])}–${fmtNum(range[1])}` : DASH;
}


function resultTable(result) {
  const columns = ["teacher", "student", "baseline"].filter((c) => result[c]);
  const rows = ROWS.filter(([key]) => columns.some((c) => result[c][key] !== undefined));
  return h(
    "table.result",
    { id: "result-table" },
    h("thead", {}, h("tr", {}, h("th", {}, ""), columns.map((c) => h("th", { dataset: { column: c } }, c)))),
    h(
      "tbody",
      {},
      rows.map(([key, label, fmt]) =>
        h(
          "tr",
          { dataset: { metric: key } },
          h("th", {}, label),
          columns.map((c) => h("td.num", { dataset: { column: c } }, fmt(result[c][key]))),
        ),
      ),
    ),
  );
}

/** Causal LMs: the teacher's and the student's continuations of validation prompts. */
function samplesTable(samples) {
  if (!samples || !samples.length) return h("span", { hidden: true });
  return h(
    "table.samples",
    { id: "samples-table" },
    h("caption", {}, "Samples (greedy)"),
    h("thead", {}, h("tr", {}, ["prompt", "teacher", "student"].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      samples.map((row) => h("tr", {}, ["prompt", "teacher", "student"].map((c) => h("td", {}, row[c] || "")))),
    ),
  );
}

function summary(result) {
  const parts = [];
  const params = result.parameter_ratio ?? result.compression_ratio;
  if (params) parts.push(`${ratioPhrase(params)} in parameters`);
  if (result.size_ratio) parts.push(`${ratioPhrase(result.size_ratio)} in bytes`);
  if (result.speedup) {
    let speed = ratioPhrase(result.speedup, "faster", "slower");
    if (Array.isArray(result.speedup_range)) speed += ` (${fmtRange(result.speedup_range)}× over ${(result.timing || {}).rounds || "the"} rounds)`;
    parts.push(speed);
  }
  if (result.method) parts.push(`method ${result.method}`);
  if (result.device) parts.push(`on ${result.device}`);
  const line = h("p.muted", { id: "summary" }, `Student against teacher: ${parts.join(" · ")}`);
  if (!(result.timing && result.timing.noisy)) return line;
  return [line, h("p.noisy", { id: "noisy" }, "Timing is noisy: the rounds disagree by more than half the median (a busy machine); take the latency figures as rough.")];
}

function verdictBox(result) {
  if (!result.verdict) return null;
  const c = result.baseline_comparison || {};
  const which = c.student_model === "before_compression" ? " (the student before compression)" : "";
  const detail = c.metric === "accuracy"
    ? ` Accuracy ${fmtPct(c.student)}${which} against ${fmtPct(c.baseline)} on ${c.n} validation samples (McNemar's exact test, p = ${c.p_value.toPrecision(2)}).`
    : c.metric ? ` ${c.metric} ${fmtNum(c.student)} against ${fmtNum(c.baseline)} (${c.test}, p = ${c.p_value.toPrecision(2)}).` : "";
  const bad = result.verdict === "baseline_better";
  return h(
    bad ? "div.verdict.warning" : "div.verdict",
    { id: "verdict", role: bad ? "alert" : "status", dataset: { verdict: result.verdict } },
    h("strong", {}, bad ? "Warning: " : "Verdict: "),
    VERDICTS[result.verdict] || result.verdict,
    detail,
    bad ? " Its files (baseline.*) are offered below beside the student's." : "",
  );
}

function compressionTable(steps) {
  if (!steps || !steps.length) return null;
  const keys = ["accuracy", "agreement", "mse", "perplexity", "token_agreement", "kl_to_teacher", "parameters", "size_bytes", "latency_ms_p50", "latency_ms_per_token"];
  const rows = [];
  for (const step of steps) {
    const name = step.step === "quantize" ? `quantize (${step.mode})` : `prune ${fmtPct(step.amount)}${step.structured ? " structured" : ""}`;
    for (const [key, label, fmt] of ROWS.filter(([k]) => keys.includes(k))) {
      if (step.before[key] === undefined && step.after[key] === undefined) continue;
      rows.push(h("tr", { dataset: { step: step.step, metric: key } }, h("th", {}, rows.length && rows[rows.length - 1].dataset.step === step.step ? "" : name), h("td", {}, label), h("td.num", {}, fmt(step.before[key])), h("td.num", {}, fmt(step.after[key]))));
    }
  }
  return [
    h("h3", {}, "Compression steps"),
    h("table.result", { id: "compression-table" }, h("thead", {}, h("tr", {}, h("th", {}, "step"), h("th", {}, "metric"), h("th", {}, "before"), h("th", {}, "after"))), h("tbody", {}, rows)),
  ];
}

function artifactList(artifacts, onError) {
  return h(
    "table.artifacts",
    { id: "artifacts" },
    h("tbody", {}, artifacts.map((a) => {
      const button = h("button", {
        type: "button",
        dataset: { artifactId: a.id, kind: a.kind },
        onclick: async () => {
          button.disabled = true;
          try {
            await download(a);
          } catch (error) {
            onError(error);
          } finally {
            button.disabled = false;
          }
        },
      }, "Download");
      return h(
        "tr",
        { dataset: { kind: a.kind } },
        h("td", {}, a.name),
        h("td.muted", {}, a.kind),
        h("td.num", {}, fmtBytes(a.size_bytes)),
        h("td.mono.small", { title: a.sha256 }, `${a.sha256.slice(0, 12)}…`),
        h("td", {}, button),
      );
    })),
  );
}

export async function render(view, { signal, params }) {
  const jobId = params.id;
  const header = h("div.heading");
  const state = h("div.state");
  const errorBox = h("p.error", { hidden: true });
  const loss = h("div.chart", { id: "loss-chart" });
  const quality = h("div.chart", { id: "accuracy-chart" });
  const resultBox = h("section", { id: "result" }, h("h2", {}, "Result"), h("p.muted", {}, "When the job succeeds: teacher, student and the labels-only baseline side by side."));
  const artifactBox = h("section", { id: "artifacts-section" }, h("h2", {}, "Artifacts"));
  const log = h("ol.log", { id: "log" });
  view.replaceChildren(
    header,
    state,
    errorBox,
    h("section.charts", {}, loss, quality),
    resultBox,
    artifactBox,
    h("details", {}, h("summary", {}, "Log"), log),
  );
  const showError = (error) => {
    errorBox.textContent = error.message;
    errorBox.hidden = false;
  };
  const curves = [
    new Curves(loss, ["train_loss", "val_loss"], "Loss", { log: true }),
    new Curves(quality, ["val_accuracy", "val_agreement", "val_mse", "val_perplexity"], "Validation accuracy"),
  ];
  signal.addEventListener("abort", () => curves.forEach((c) => c.destroy()));

  let job = null;
  let finished = false;
  let poll = null;

  function draw() {
    const cancel = h("button.danger", {
      id: "cancel",
      type: "button",
      hidden: !ACTIVE.has(job.status) || job.status === "cancelling",
      onclick: async () => {
        cancel.disabled = true;
        try {
          job = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" });
          draw();
        } catch (error) {
          showError(error);
          cancel.disabled = false;
        }
      },
    }, "Cancel job");
    header.replaceChildren(
      h("h1", {}, job.name || job.id),
      h("span", { id: "job-status" }, statusBadge(job.status)),
      cancel,
    );
    const p = job.progress || {};
    const parts = [];
    if (ACTIVE.has(job.status)) {
      if (p.label) parts.push(p.label);
      else if (p.stages > 1) parts.push(`stage ${p.stage || 1}/${p.stages}`);
      if (p.epoch) parts.push(`epoch ${p.epoch}/${p.epochs}`);
      if (p.eta_seconds) parts.push(`about ${fmtDuration(p.eta_seconds)} left`);
    }
    parts.push(`created ${fmtAge(job.created_at)}`, job.id, `queue ${job.queue || DASH}`, `attempt ${job.attempt}`);
    state.replaceChildren(progressBar(job), h("span.muted", {}, parts.join(" · ")));
    if (job.error) showError({ message: `${job.error.code}: ${job.error.message}` });
  }

  async function finish() {
    if (finished) return;
    finished = true;
    clearTimeout(poll);
    if (job.result) {
      const parts = [
        h("h2", {}, "Result"),
        verdictBox(job.result),
        resultTable(job.result),
        samplesTable(job.result.samples),
        summary(job.result),
        compressionTable(job.result.compression),
      ];
      resultBox.replaceChildren(...parts.flat().filter(Boolean));
    }
    else resultBox.hidden = true;
    const artifacts = await api(`/v1/jobs/${jobId}/artifacts`, { signal });
    artifactBox.replaceChildren(
      h("h2", {}, "Artifacts"),
      artifacts.data.length ? artifactList(artifacts.data, showError) : h("p.muted", {}, "None."),
    );
  }

  async function refresh() {
    job = await api(`/v1/jobs/${jobId}`, { signal });
    draw();
    if (ACTIVE.has(job.status)) {
      poll = setTimeout(() => refresh().catch(() => {}), POLL_MS);
    } else {
      await finish();
    }
  }

  function onEvent(event) {
    if (event.type === "metrics") curves.forEach((c) => c.add(event.data));
    else if (event.type === "log") {
      const message = `${event.data.message || JSON.stringify(event.data)}`;
      log.append(h(message.startsWith("warning:") ? "li.warning" : "li", {}, message));
    }
    else if (event.type === "status") log.append(h("li.muted", {}, `status: ${event.data.status}`));
  }

  signal.addEventListener("abort", () => clearTimeout(poll));
  try {
    await refresh();
    const history = await eventHistory(jobId, signal);
    history.forEach(onEvent);
    view.dataset.historyLoaded = "true";
    if (ACTIVE.has(job.status)) {
      const last = history.length ? history[history.length - 1].seq : 0;
      await streamEvents(jobId, last, onEvent, signal);
      if (!signal.aborted) {
        clearTimeout(poll);
        await refresh();
      }
    }
  } catch (error) {
    if (!signal.aborted) showError(error);
  }
}
