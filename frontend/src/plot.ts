// Plotly in the page: theme colours applied, responsive, click events forwarded.
import Plotly from "plotly.js-dist-min";
import type { Figure } from "./charts";
import { h } from "./dom";

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

export function plotInto(
  container: HTMLElement,
  fig: Figure,
  label: string,
  onClick?: (point: any) => void,
): HTMLElement {
  const el = h("div", { class: "plot", role: "img", "aria-label": label });
  container.append(el);
  Plotly.newPlot(el, fig.data, themed(fig.layout), { responsive: true, displaylogo: false });
  if (onClick) (el as any).on("plotly_click", (e: any) => e.points?.[0] && onClick(e.points[0]));
  return el;
}

export function replot(el: HTMLElement, fig: Figure): void {
  Plotly.react(el, fig.data, themed(fig.layout));
}
