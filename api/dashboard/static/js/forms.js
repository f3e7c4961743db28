// Forms: the new-job form (defaults from /dashboard/config.json, pickers from the lists) and the
// model and dataset uploads. A 422's message is shown next to the field it names.

import { ApiError, api, listAll } from "./api.js";
import { DASH, fmtAge, fmtBytes, fmtCount, h } from "./dom.js";

const METHOD_KNOBS = {
  kd: ["temperature", "alpha"],
  mse: ["alpha"],
  dkd: ["temperature"],
  fitnet: ["temperature", "alpha"],
  attention: ["temperature", "alpha"],
  rkd: ["temperature", "alpha"],
};

// --- shared ---------------------------------------------------------------------------------

function field(label, name, control, hint) {
  control.name = name;
  control.id = `f-${name.replace(/\./g, "-")}`;
  return h(
    "div.field",
    { dataset: { field: name } },
    h("label", { for: control.id }, label),
    control,
    hint ? h("small.muted", {}, hint) : null,
    h("small.field-error", { dataset: { errorFor: name }, hidden: true }),
  );
}

function select(options, value) {
  return h(
    "select",
    {},
    options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
  );
}

/** A number input; a value the service chooses from the data ("auto") is left empty. */
const number = (value, step = "any") => {
  const auto = value === "auto" || (value !== null && typeof value === "object");
  return h("input", {
    type: "number",
    step,
    value: auto ? "" : value ?? "",
    placeholder: auto ? "auto" : "",
  });
};
const text = (value = "", placeholder = "") => h("input", { type: "text", value, placeholder });

function clearErrors(form) {
  for (const node of form.querySelectorAll(".field-error, .form-error")) {
    node.textContent = "";
    node.hidden = true;
  }
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

/** Show an API error next to the field it names (or the nearest enclosing one), else on top. */
function showError(form, error) {
  const name = (error.details && error.details.field) || "";
  const parts = name.split(".");
  for (let n = parts.length; n > 0 && name; n--) {
    const key = parts.slice(0, n).join(".");
    const slot = form.querySelector(`[data-error-for="${CSS.escape(key)}"]`);
    if (slot) {
      slot.textContent = error.message;
      slot.hidden = false;
      const control = form.elements.namedItem(key);
      if (control && control.setAttribute) control.setAttribute("aria-invalid", "true");
      if (control && control.focus) control.focus();
      return;
    }
  }
  const top = form.querySelector(".form-error");
  top.textContent = error.message;
  top.hidden = false;
}

// --- new job ---------------------------------------------------------------------------------

function value(form, name) {
  const control = form.elements.namedItem(name);
  return control ? control.value.trim() : "";
}

function numberValue(form, name) {
  const raw = value(form, name);
  return raw === "" ? undefined : Number(raw);
}

/** The spec the form describes; empty optional inputs are left out (the server's default). */
export function specFrom(form) {
  const method = value(form, "distillation.method");
  const distillation = { method };
  for (const knob of METHOD_KNOBS[method] || []) {
    const v = numberValue(form, `distillation.${knob}`);
    if (v !== undefined) distillation[knob] = v;
  }
  const training = {};
  for (const name of ["epochs", "batch_size", "lr", "max_minutes"]) {
    const v = numberValue(form, `training.${name}`);
    if (v !== undefined) training[name] = v;
  }
  training.optimizer = value(form, "training.optimizer");
  training.device = value(form, "training.device");
  training.baseline = form.elements.namedItem("training.baseline").checked;
  const student = { preset: value(form, "student.preset") };
  for (const name of ["width", "depth"]) {
    const v = numberValue(form, `student.${name}`);
    if (v !== undefined) student[name] = v;
  }
  const compression = { quantize: value(form, "compression.quantize") };
  const prune = numberValue(form, "compression.prune.amount");
  if (prune !== undefined) compression.prune = { amount: prune };
  const spec = {
    teacher: { model_id: value(form, "teacher.model_id") },
    dataset_id: value(form, "dataset_id"),
    student,
    distillation,
    training,
    compression,
    export: [...form.querySelectorAll("input[name=export]:checked")].map((c) => c.value),
  };
  const name = value(form, "name");
  if (name) spec.name = name;
  return spec;
}

export async function renderNewJob(view, { navigate }) {
  const [config, models, datasets] = await Promise.all([
    fetch("/dashboard/config.json").then((r) => r.json()),
    listAll("/v1/models"),
    listAll("/v1/datasets"),
  ]);
  const t = config.training;
  const kd = config.method_defaults.kd;
  const preset = "mlp";
  const modelOptions = models.map((m) => [m.id, `${m.name} (${m.format}, ${fmtCount(m.parameters)} params)`]);
  const datasetOptions = datasets.map((d) => [d.id, `${d.name} (${d.n_samples} samples${d.has_labels ? `, ${d.n_classes} classes` : ", no labels"})`]);
  // Empty sizes: an mlp is sized from the teacher, another preset takes its own defaults.
  const width = number("auto", "1");
  const depth = number("auto", "1");
  const presetSelect = select(Object.keys(config.presets).map((p) => [p, p]), preset);
  const methodSelect = select(config.methods.map((m) => [m, m]), "kd");
  const temperature = number(kd.temperature);
  const alpha = number(kd.alpha);
  const syncKnobs = () => {
    const knobs = METHOD_KNOBS[methodSelect.value] || [];
    temperature.disabled = !knobs.includes("temperature");
    alpha.disabled = !knobs.includes("alpha");
  };
  methodSelect.addEventListener("change", syncKnobs);
  syncKnobs();
  const baseline = h("input", { type: "checkbox", checked: t.baseline });

  const form = h(
    "form.job-form",
    { id: "job-form", novalidate: true },
    h("p.form-error.error", { hidden: true }),
    h(
      "fieldset",
      {},
      h("legend", {}, "What to distil"),
      field("Name", "name", text("", "optional")),
      field("Teacher", "teacher.model_id", select(modelOptions, modelOptions[0]?.[0]),
        models.length ? null : "upload a teacher first (Models & datasets)"),
      field("Dataset", "dataset_id", select(datasetOptions, datasetOptions[0]?.[0]),
        datasets.length ? null : "upload a transfer set first (Models & datasets)"),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Student and method"),
      field("Student preset", "student.preset", presetSelect),
      field("Width", "student.width", width, "empty: chosen for you (an mlp from the teacher's size)"),
      field("Depth", "student.depth", depth),
      field("Method", "distillation.method", methodSelect),
      field("Temperature", "distillation.temperature", temperature),
      field("Alpha", "distillation.alpha", alpha, "weight of the teacher's loss vs the labels'"),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Training"),
      field("Epochs", "training.epochs", number(t.epochs, "1"), "empty: chosen from the dataset's size"),
      field("Batch size", "training.batch_size", number(t.batch_size, "1")),
      field("Learning rate", "training.lr", number(t.lr), "empty: found by short trials on the validation split"),
      field("Optimizer", "training.optimizer", select([["adamw", "adamw"], ["sgd", "sgd"]], t.optimizer)),
      field("Device", "training.device", select([["auto", "auto"], ["cpu", "cpu"], ["cuda", "cuda"]], t.device)),
      field("Time limit (minutes)", "training.max_minutes", number(t.max_minutes)),
      field("Labels-only baseline", "training.baseline", baseline, "train the same student on the labels alone, for comparison"),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Compression and export"),
      field("Quantize", "compression.quantize", select(config.quantize.map((q) => [q, q]), "none")),
      field("Prune amount", "compression.prune.amount", number(""), "empty: no pruning; 0.5 removes half the weights"),
      h(
        "div.field",
        { dataset: { field: "export" } },
        h("span.label", {}, "Export"),
        ["torchscript", "onnx", "safetensors", "hf"].map((f) =>
          h("label.check", {}, h("input", { type: "checkbox", name: "export", value: f, checked: config.export.includes(f) }), f),
        ),
        h("small.field-error", { dataset: { errorFor: "export" }, hidden: true }),
      ),
    ),
    h("div.actions", {}, h("button.primary", { type: "submit", id: "submit-job" }, "Start job")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const button = form.querySelector("#submit-job");
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: specFrom(form) });
      navigate(`/jobs/${job.id}`);
    } catch (error) {
      showError(form, error instanceof ApiError ? error : { message: error.message });
    } finally {
      button.disabled = false;
    }
  });
  view.replaceChildren(h("h1", {}, "New job"), form);
}

// --- uploads ----------------------------------------------------------------------------------

function shape(s) {
  return s ? `[${s.map((d) => (d === null ? "N" : d)).join(", ")}]` : DASH;
}

function modelRow(m) {
  const sig = m.signature || {};
  const io = `${shape(sig.inputs && sig.inputs[0] && sig.inputs[0].shape)} → ${shape(sig.outputs && sig.outputs[0] && sig.outputs[0].shape)}`;
  return h(
    "tr",
    { dataset: { id: m.id } },
    h("td", {}, m.name, h("div.muted.small.mono", {}, m.id)),
    h("td", {}, m.format),
    h("td.num", {}, fmtCount(m.parameters)),
    h("td.num", {}, fmtBytes(m.size_bytes)),
    h("td.mono.small", {}, io),
    h("td", {}, fmtAge(m.created_at)),
  );
}

function datasetRow(d) {
  return h(
    "tr",
    { dataset: { id: d.id } },
    h("td", {}, d.name, h("div.muted.small.mono", {}, d.id)),
    h("td", {}, d.format),
    h("td.num", {}, fmtCount(d.n_samples)),
    h("td.mono.small", {}, `${shape(d.x_shape)} ${d.x_dtype || ""}`),
    h("td", {}, d.has_labels ? `${d.n_classes ?? "?"} classes` : "no labels"),
    h("td.num", {}, fmtBytes(d.size_bytes)),
    h("td", {}, fmtAge(d.created_at)),
  );
}

function table(id, headings, rows) {
  return h(
    "table.list",
    { id },
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows),
  );
}

function uploadForm(id, route, fields, onDone) {
  const status = h("span.muted", { role: "status" });
  const form = h(
    "form.upload",
    { id, novalidate: true },
    h("p.form-error.error", { hidden: true }),
    field("File", "file", h("input", { type: "file", required: true })),
    fields,
    h("div.actions", {}, h("button.primary", { type: "submit" }, "Upload"), status),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const file = form.elements.namedItem("file").files[0];
    if (!file) {
      showError(form, { message: "choose a file to upload", details: { field: "file" } });
      return;
    }
    const body = new FormData();
    body.append("file", file, file.name);
    for (const control of form.querySelectorAll("input[type=text], select")) {
      if (control.value.trim()) body.append(control.name, control.value.trim());
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    status.textContent = "Uploading and checking the file…";
    try {
      const item = await api(route, { method: "POST", form: body });
      status.textContent = `Uploaded ${item.name} (${item.id}).`;
      form.reset();
      onDone(item);
    } catch (error) {
      status.textContent = "";
      showError(form, error);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export async function renderUploads(view) {
  const [models, datasets] = await Promise.all([listAll("/v1/models"), listAll("/v1/datasets")]);
  const modelTable = table(
    "models-table",
    ["Model", "Format", "Params", "Size", "Input → output", "Uploaded"],
    models.map(modelRow),
  );
  const datasetTable = table(
    "datasets-table",
    ["Dataset", "Format", "Samples", "Inputs", "Labels", "Size", "Uploaded"],
    datasets.map(datasetRow),
  );
  const modelForm = uploadForm(
    "model-form",
    "/v1/models",
    [
      field("Name", "name", text("", "optional")),
      field(
        "Format",
        "format",
        select(
          [["", "detect"], ["exported_program", "exported_program (.pt2)"], ["onnx", "onnx"],
            ["torchscript", "torchscript (.pt)"], ["safetensors", "safetensors"],
            ["hf", "hf (zip of save_pretrained)"]],
          "",
        ),
      ),
      field("Input shape", "input_shape", text("", "e.g. [1, 8, 8]"), "TorchScript: one sample's shape"),
      field("Architecture", "arch", text("", "safetensors only")),
    ],
    (m) => modelTable.tBodies[0].prepend(modelRow(m)),
  );
  const datasetForm = uploadForm(
    "dataset-form",
    "/v1/datasets",
    [
      field("Name", "name", text("", "optional")),
      field("Label column", "label_column", text("", "CSV / Parquet only")),
    ],
    (d) => datasetTable.tBodies[0].prepend(datasetRow(d)),
  );
  view.replaceChildren(
    h("h1", {}, "Models & datasets"),
    h("section", {}, h("h2", {}, "Teachers and students"), modelTable, h("h3", {}, "Upload a model"), modelForm),
    h("section", {}, h("h2", {}, "Datasets"), datasetTable, h("h3", {}, "Upload a dataset"), datasetForm),
  );
}
