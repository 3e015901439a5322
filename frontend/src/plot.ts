// Plotly in the page: theme colours applied, responsive, click events forwarded, every chart exportable
// (PNG and SVG from the modebar, a heatmap's grid as CSV).
import type { Figure } from "./charts";
import { h } from "./dom";
import { csvButton, fileName, heatmapCsv } from "./export";
import { quickHeatmap, quickable } from "./quickheatmap";

/** Plotly (src/plotly.ts) is a chunk of its own, loaded on the first draw, or by main.ts with the code
 * of a view that plots. A heatmap it can draw (quickheatmap.ts) shows at once instead, and Plotly is
 * loaded once that has been painted (fetching and compiling it earlier slowed the first paint on 2 cores:
 * bench/dashboard.py --other-build). */
let Plotly: any = null; // once started
let starting: Promise<any> | null = null;
const startPlotly = () => (starting ??= import("./plotly").then((m) => (Plotly = m.default)));

/** Figures draw one per task, in the order asked for: the first (a view's main chart) shows before the
 * next is laid out, and the page answers input while a view with many charts fills in. A failed draw
 * (a Plotly that failed to load too) is reported (window "error") without stopping the ones after it.
 * `painted`: Plotly (long to start) waits for the page to be painted first. */
let queue: Promise<unknown> = Promise.resolve();
function draw(step: (Plotly: any) => unknown, painted = false): void {
  queue = queue.then(async () => {
    try {
      if (painted && !Plotly) await afterPaint();
      await step(await startPlotly());
    } catch (e) {
      reportError(e);
    }
    await nextTask();
  });
}

/** After the next frame is painted (or 200 ms: a hidden page paints none). */
function afterPaint(): Promise<void> {
  return new Promise((resolve) => {
    requestAnimationFrame(() => void nextTask().then(resolve));
    setTimeout(resolve, 200);
  });
}

/** A fresh task (a message to ourselves: unlike setTimeout, not throttled in background tabs). */
function nextTask(): Promise<void> {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

/** The figure's layout in the page's colours (light or dark). */
function themed(layout: any): any {
  const dark = document.documentElement.classList.contains("dark");
  const grid = dark ? "#2d343c" : "#e3e7eb";
  const axes = Object.fromEntries(
    Object.entries(layout)
      .filter(([k]) => /^[xy]axis\d*$/.test(k))
      .map(([k, v]) => [k, { gridcolor: grid, zerolinecolor: grid, linecolor: grid, ...(v as object) }]),
  );
  return {
    ...layout,
    ...axes,
    autosize: true,
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: { color: dark ? "#e6e9ed" : "#1b1f24", size: 12 },
  };
}

/** The modebar: PNG (Plotly's toImage button) and SVG downloads named after the chart. */
function config(Plotly: any, label: string): object {
  const filename = fileName(label, "").slice(0, -1);
  const svg = {
    name: "Download plot as an SVG",
    title: "Download plot as an SVG",
    icon: Plotly.Icons.camera,
    click: (gd: HTMLElement) => Plotly.downloadImage(gd, { format: "svg", filename }),
  };
  return {
    responsive: true,
    displaylogo: false,
    toImageButtonOptions: { format: "png", filename, scale: 2 },
    modeBarButtonsToAdd: [svg],
  };
}

/** A chart's click handler, for its quick heatmap redrawn before Plotly's. */
const clicks = new WeakMap<HTMLElement, (point: any) => void>();

/** Draw `fig` into a new chart in `container`. `quick`: a view's first chart, drawn at once by
 * quickheatmap.ts (when it can and Plotly has not started yet) until Plotly's replaces it. */
export function plotInto(
  container: HTMLElement,
  fig: Figure,
  label: string,
  onClick?: (point: any) => void,
  quick = false,
): HTMLElement {
  const el = h("div", { class: "plot", role: "img", "aria-label": label });
  if (fig.data[0]?.type === "heatmap") {
    // the grid as drawn now (replot may have changed it), in the colour bar's unit
    const rows = () => heatmapCsv((el as any).data?.[0] ?? fig.data[0]);
    container.append(h("div", { class: "export-bar" }, csvButton(label, rows)));
  }
  container.append(el);
  const layout = themed(fig.layout);
  // until Plotly has started: the quick heatmap, over the place Plotly will fill
  const drawn = quick && !Plotly && quickable(fig, el.clientWidth);
  if (onClick) clicks.set(el, onClick);
  if (drawn) {
    el.style.minHeight = `${layout.height}px`;
    el.append(quickHeatmap({ ...fig, layout }, el.clientWidth, onClick));
  }
  draw(async (Plotly) => {
    await Plotly.newPlot(el, fig.data, layout, config(Plotly, label));
    el.querySelector(".quick-heatmap")?.remove(); // the first, or the one replot() drew over it
    el.style.minHeight = "";
    if (onClick) (el as any).on("plotly_click", (e: any) => e.points?.[0] && onClick(e.points[0]));
  }, drawn);
  return el;
}

/** Redraw with new data, after the figure's first draw. */
export function replot(el: HTMLElement, fig: Figure): void {
  const layout = themed(fig.layout);
  const quick = el.querySelector(".quick-heatmap"); // Plotly has not drawn this one yet
  if (quick && quickable(fig, el.clientWidth))
    quick.replaceWith(quickHeatmap({ ...fig, layout }, el.clientWidth, clicks.get(el)));
  else quick?.remove(); // not one to draw quick: Plotly's, when it comes
  draw((Plotly) => Plotly.react(el, fig.data, layout));
}
