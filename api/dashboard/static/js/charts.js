// Training curves with uPlot (vendored, global `uPlot`): one line per stage label and metric,
// optimizer steps on the x axis (the baseline gets as many steps as the student, so their
// curves line up even when it runs more epochs), redrawn as metrics events arrive.

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const DASHED = new Set(["val_loss", "val_agreement"]);

/** Where a row sits on the x axis: its optimizer step, or its epoch for older jobs. */
function position(row) {
  return typeof row.step === "number" ? row.step : row.epoch;
}

export class Curves {
  /**
   * @param {HTMLElement} container  @param {string[]} metrics  @param {string} title
   * @param {{log?: boolean}} options  log: a logarithmic y axis (losses span decades)
   */
  constructor(container, metrics, title, { log = false } = {}) {
    this.container = container;
    this.metrics = metrics;
    this.title = title;
    this.log = log;
    this.rows = [];
    this.plot = null;
    this.keys = "";
    this.axis = "step";
    this.container.dataset.points = "0";
    this.container.dataset.yScale = log ? "log" : "linear";
  }

  /** One epoch's metrics (an event's data: label, epoch, step, train_loss, val_accuracy, …).
   * The job's last metrics event (the delivered student's figures, no epoch) is not a point. */
  add(row) {
    if (typeof position(row) !== "number") return;
    if (!this.metrics.some((m) => typeof row[m] === "number")) return;
    this.rows.push(row);
    this.render();
  }

  series() {
    const keys = [];
    for (const row of this.rows) {
      for (const metric of this.metrics) {
        const key = `${row.label || "student"} · ${metric}`;
        if (typeof row[metric] === "number" && !keys.includes(key)) keys.push(key);
      }
    }
    return keys;
  }

  data(keys) {
    const xs = [...new Set(this.rows.map(position))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const columns = keys.map(() => xs.map(() => null));
    for (const row of this.rows) {
      for (const metric of this.metrics) {
        const k = keys.indexOf(`${row.label || "student"} · ${metric}`);
        const value = row[metric];
        // A log axis cannot show 0 or below: such a point is left out rather than drawn wrong.
        if (k >= 0 && typeof value === "number" && (!this.log || value > 0)) {
          columns[k][at.get(position(row))] = value;
        }
      }
    }
    return [xs, ...columns];
  }

  render() {
    const keys = this.series();
    const data = this.data(keys);
    this.axis = this.rows.every((r) => typeof r.step === "number") ? "step" : "epoch";
    this.container.dataset.points = String(this.rows.length);
    this.container.dataset.series = String(keys.length);
    this.container.dataset.xAxis = this.axis;
    if (this.plot && keys.join("|") === this.keys) {
      this.plot.setData(data);
      return;
    }
    if (this.plot) this.plot.destroy();
    this.keys = keys.join("|");
    const labels = [...new Set(this.rows.map((r) => r.label || "student"))];
    const width = Math.max(320, (this.container.clientWidth || 576) - 16); // minus the padding
    const xLabel = this.axis === "step" ? "optimizer step" : "epoch";
    this.plot = new uPlot(
      {
        title: this.title,
        width,
        height: 260,
        scales: { x: { time: false }, y: this.log ? { distr: 3 } : {} },
        axes: [{ label: xLabel }, { label: this.log ? "log scale" : undefined }],
        series: [
          { label: xLabel },
          ...keys.map((key) => {
            const [label, metric] = key.split(" · ");
            const color = COLORS[labels.indexOf(label) % COLORS.length];
            return {
              label: key,
              stroke: color,
              width: 2,
              dash: DASHED.has(metric) ? [6, 4] : undefined,
              spanGaps: true,
              points: { show: true, size: 5 },
            };
          }),
        ],
      },
      data,
      this.container,
    );
  }

  destroy() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }
}
