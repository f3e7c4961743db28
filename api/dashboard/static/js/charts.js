// Training curves with uPlot (vendored, global `uPlot`): one line per stage label and metric,
// epochs on the x axis, redrawn as metrics events arrive.

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const DASHED = new Set(["val_loss", "val_agreement"]);

export class Curves {
  /** @param {HTMLElement} container  @param {string[]} metrics  @param {string} title */
  constructor(container, metrics, title) {
    this.container = container;
    this.metrics = metrics;
    this.title = title;
    this.rows = [];
    this.plot = null;
    this.keys = "";
    this.container.dataset.points = "0";
  }

  /** One epoch's metrics (an event's data: label, epoch, train_loss, val_accuracy, …). */
  add(row) {
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
    const epochs = Math.max(...this.rows.map((r) => r.epoch || 0), 1);
    const xs = Array.from({ length: epochs }, (_, i) => i + 1);
    const columns = keys.map(() => xs.map(() => null));
    for (const row of this.rows) {
      for (const metric of this.metrics) {
        const k = keys.indexOf(`${row.label || "student"} · ${metric}`);
        if (k >= 0 && row.epoch >= 1) columns[k][row.epoch - 1] = row[metric];
      }
    }
    return [xs, ...columns];
  }

  render() {
    const keys = this.series();
    const data = this.data(keys);
    this.container.dataset.points = String(this.rows.length);
    this.container.dataset.series = String(keys.length);
    if (this.plot && keys.join("|") === this.keys) {
      this.plot.setData(data);
      return;
    }
    if (this.plot) this.plot.destroy();
    this.keys = keys.join("|");
    const labels = [...new Set(this.rows.map((r) => r.label || "student"))];
    const width = Math.max(320, (this.container.clientWidth || 576) - 16); // minus the padding
    this.plot = new uPlot(
      {
        title: this.title,
        width,
        height: 260,
        scales: { x: { time: false } },
        axes: [{ label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, {}],
        series: [
          { label: "epoch" },
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
