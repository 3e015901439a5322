// A heatmap drawn at once as SVG from the figure plot.ts is given, while Plotly (the page's largest
// chunk) still loads and starts: the same cells in Plotly's colours, cell values, axis labels and colour
// bar, laid out where Plotly puts them, so the swap to the interactive chart (plot.ts) does not move.
// Only figures with a fixed colour range (the shares: 0–100 %) and category axes are drawn here.
import type { Figure } from "./charts";

type Stops = [number, string][];

/** Plotly's named colour scales that COLOUR_SCALES (charts.ts) use, as plotly.js 4 defines them
 * (src/components/colorscale/scales.js; test/quickheatmap.test.ts compares them). */
export const NAMED_SCALES: Record<string, Stops> = {
  Viridis: [
    [0, "#440154"],
    [0.06274509803921569, "#48186a"],
    [0.12549019607843137, "#472d7b"],
    [0.18823529411764706, "#424086"],
    [0.25098039215686274, "#3b528b"],
    [0.3137254901960784, "#33638d"],
    [0.3764705882352941, "#2c728e"],
    [0.4392156862745098, "#26828e"],
    [0.5019607843137255, "#21918c"],
    [0.5647058823529412, "#1fa088"],
    [0.6274509803921569, "#28ae80"],
    [0.6901960784313725, "#3fbc73"],
    [0.7529411764705882, "#5ec962"],
    [0.8156862745098039, "#84d44b"],
    [0.8784313725490196, "#addc30"],
    [0.9411764705882353, "#d8e219"],
    [1, "#fde725"],
  ],
  Cividis: [
    [0, "rgb(0,32,76)"],
    [0.058824, "rgb(0,42,102)"],
    [0.117647, "rgb(0,52,110)"],
    [0.176471, "rgb(39,63,108)"],
    [0.235294, "rgb(60,74,107)"],
    [0.294118, "rgb(76,85,107)"],
    [0.352941, "rgb(91,95,109)"],
    [0.411765, "rgb(104,106,112)"],
    [0.470588, "rgb(117,117,117)"],
    [0.529412, "rgb(131,129,120)"],
    [0.588235, "rgb(146,140,120)"],
    [0.647059, "rgb(161,152,118)"],
    [0.705882, "rgb(176,165,114)"],
    [0.764706, "rgb(192,177,109)"],
    [0.823529, "rgb(209,191,102)"],
    [0.882353, "rgb(225,204,92)"],
    [0.941176, "rgb(243,219,79)"],
    [1, "rgb(255,233,69)"],
  ],
  YlGnBu: [
    "rgb(8,29,88)",
    "rgb(37,52,148)",
    "rgb(34,94,168)",
    "rgb(29,145,192)",
    "rgb(65,182,196)",
    "rgb(127,205,187)",
    "rgb(199,233,180)",
    "rgb(237,248,217)",
    "rgb(255,255,217)",
  ].map((c, i): [number, string] => [i / 8, c]),
  YlOrRd: [
    "rgb(128,0,38)",
    "rgb(189,0,38)",
    "rgb(227,26,28)",
    "rgb(252,78,42)",
    "rgb(253,141,60)",
    "rgb(254,178,76)",
    "rgb(254,217,118)",
    "rgb(255,237,160)",
    "rgb(255,255,204)",
  ].map((c, i): [number, string] => [i / 8, c]),
  RdBu: [
    [0, "rgb(5,10,172)"],
    [0.35, "rgb(106,137,247)"],
    [0.5, "rgb(190,190,190)"],
    [0.6, "rgb(220,170,132)"],
    [0.7, "rgb(230,145,90)"],
    [1, "rgb(178,10,28)"],
  ],
};

type Rgb = [number, number, number];

/** A named scale's stops, mirrored when reversed (Plotly's flipScale). */
function scaleStops(name: string, reverse: boolean): Stops {
  const named = NAMED_SCALES[name];
  return reverse ? named.map(([s, c]): [number, string] => [1 - s, c]).reverse() : named;
}

/** A stop's channels as Plotly holds them (Color.rgbaArray: parsed to 0–1, times 255: not always whole). */
function parseColour(c: string): Rgb {
  const bytes = c.startsWith("#")
    ? [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16))
    : c
        .slice(c.indexOf("(") + 1, -1)
        .split(",")
        .map(Number);
  return bytes.map((v) => (v / 255) * 255) as Rgb;
}

/** z -> the colour Plotly paints a heatmap cell: piecewise linear in RGB between the scale's stops
 * over [zmin, zmax] (clamped outside; reversed: the stops mirrored), each channel rounded. The float
 * steps are d3 v3's (scale.linear().clamp(true)), so that a channel halfway rounds as Plotly's does. */
export function colourScale(name: string, reverse: boolean, zmin: number, zmax: number): (z: number) => Rgb {
  const stops = scaleStops(name, reverse);
  const domain = stops.map(([s]) => zmin + s * (zmax - zmin));
  const range = stops.map(([, c]) => parseColour(c));
  const last = domain.length - 2;
  return (z) => {
    let i = 0;
    while (i < last && z >= domain[i + 1]) i++; // d3's bisect: a stop starts the segment above it
    const width = domain[i + 1] - domain[i] || 1 / (domain[i + 1] - domain[i]);
    const t = Math.min(1, Math.max(0, (z - domain[i]) / width));
    return range[i].map((a, k) => Math.round(a * (1 - t) + range[i + 1][k] * t)) as Rgb;
  };
}

/** WCAG 2 relative luminance of an sRGB colour. */
function luminance(c: Rgb): number {
  const lin = c.map((v) => (v / 255 <= 0.04045 ? v / 255 / 12.92 : ((v / 255 + 0.055) / 1.055) ** 2.4));
  return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
}
const contrast = (a: number, b: number) => (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
const WHITE = luminance([255, 255, 255]),
  LINE = luminance([68, 68, 68]);

/** The colour Plotly writes a cell's text in: white on a dark cell, its default line grey (#444) on a
 * light one (Color.contrast). */
export function textColour(cell: Rgb): string {
  const l = luminance(cell);
  return contrast(l, WHITE) > contrast(l, LINE) ? "rgb(255, 255, 255)" : "rgb(68, 68, 68)";
}

/** Whether this figure can be drawn here: one heatmap with a fixed colour range, category axes (the
 * first row on top), no axis titles. */
export function quickable(fig: Figure, width: number): boolean {
  const t = fig.data[0];
  return (
    plotWidth(fig, width) > 0 && // laid out, and wide enough for a plot beside the colour bar
    fig.data.length === 1 &&
    t?.type === "heatmap" &&
    typeof t.zmin === "number" &&
    typeof t.zmax === "number" &&
    t.colorscale in NAMED_SCALES &&
    fig.layout.xaxis?.type === "category" &&
    fig.layout.yaxis?.type === "category" &&
    fig.layout.yaxis.autorange === "reversed" && // the first row on top, as drawn here
    !fig.layout.xaxis.title &&
    !fig.layout.yaxis.title
  );
}

// Plotly's geometry for such a figure (plotly.js 4 defaults, measured): the colour bar stands 2 % of the
// plot's width right of it, 10 px padding, 30 px thick, its labels 3.4 px off it; with 0–100 labels and a
// two-line title it and the space after it take 114 px of the width, in place of the right margin.
const CB = { gap: 0.02, pad: 10, thick: 30, width: 114, labelOff: 3.4, titleOff: 32 };
const FONT = '"Open Sans", verdana, arial, sans-serif'; // Plotly's default family
const LINE_SPACING = 1.3;
const TICK = "#444"; // Plotly's tick and colour bar outline colour, in either theme

/** The plot area's width in a figure `width` px wide: what the margin and the colour bar leave. */
const plotWidth = (fig: Figure, width: number) =>
  Math.round((width - fig.layout.margin.l - Math.max(fig.layout.margin.r, CB.width)) / (1 + CB.gap));

/** Plotly's "nice" tick step: the range over at most ~length/40 ticks, rounded up to 2, 5 or 10 × 10^k. */
function tickStep(range: number, length: number): number {
  const rough = range / (Math.min(9, Math.max(4, length / 40)) + 1);
  const base = 10 ** Math.floor(Math.log10(rough));
  return base * ([2, 5, 10].find((m) => m >= rough / base) ?? 10);
}

/** Plotly text (names escaped by charts.ts plotlyText, lines as <br>) as plain text. */
const plain = (s: string) =>
  s.replace(/<br>/g, "\n").replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");

const SVG = "http://www.w3.org/2000/svg";
function el(tag: string, attrs: Record<string, string | number>, text?: string): SVGElement {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/**
 * The figure (its layout themed: font colour) as an SVG `width` px wide. A click on a cell calls
 * `onClick` with the point Plotly would pass ({x, y}: the cell's category names as in the figure).
 */
export function quickHeatmap(
  fig: Figure,
  width: number,
  onClick?: (point: { x: string; y: string }) => void,
): SVGSVGElement {
  const t = fig.data[0],
    { layout } = fig;
  const m = layout.margin,
    height = layout.height as number;
  const colour = layout.font?.color ?? "#444";
  const rows = t.z as (number | null)[][],
    xs = t.x as string[],
    ys = t.y as string[];
  const plotW = plotWidth(fig, width),
    plotH = height - m.t - m.b;
  const xAt = (j: number) => Math.round(m.l + (plotW * j) / xs.length);
  const yAt = (i: number) => Math.round(m.t + (plotH * i) / ys.length); // reversed: row 0 on top
  const paint = colourScale(t.colorscale, Boolean(t.reversescale), t.zmin, t.zmax);
  const svg = el("svg", { class: "quick-heatmap", width, height, "font-family": FONT }) as SVGSVGElement;

  const cells = el("g", { class: "cells", "shape-rendering": "crispEdges" });
  const texts = el("g", {
    "font-size": t.textfont?.size ?? 10,
    "text-anchor": "middle",
    "pointer-events": "none",
  });
  rows.forEach((row, i) =>
    row.forEach((z, j) => {
      if (z === null) return; // a gap, as in Plotly
      const rgb = paint(z);
      const [x0, x1, y0, y1] = [xAt(j), xAt(j + 1), yAt(i), yAt(i + 1)];
      const rect = el("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, fill: `rgb(${rgb})` });
      rect.dataset.i = String(i);
      rect.dataset.j = String(j);
      cells.append(rect);
      const text = t.text?.[i]?.[j];
      if (text)
        texts.append(
          el(
            "text",
            {
              class: "celltext",
              x: m.l + Math.round((plotW * (j + 0.5)) / xs.length),
              y: m.t + Math.round((plotH * (i + 0.5)) / ys.length) + 3.5,
              fill: textColour(rgb),
            },
            text,
          ),
        );
    }),
  );
  if (onClick)
    cells.addEventListener("click", (e) => {
      const d = (e.target as SVGElement).dataset;
      if (d.i !== undefined) onClick({ x: xs[Number(d.j)], y: ys[Number(d.i)] });
    });

  // axes as Plotly's: at every category (fewer if their labels would crowd) a grid line under the cells,
  // a tick and a label; axis lines along the left and bottom
  const grid = el("g", { stroke: layout.xaxis.gridcolor ?? "#eee", "shape-rendering": "crispEdges" });
  const lines = el("g", { stroke: layout.xaxis.linecolor ?? "#444", "shape-rendering": "crispEdges" });
  const labels = el("g", { "font-size": 12, fill: colour });
  const step = (n: number, length: number) => Math.ceil(Math.max((n * 14) / length, 1));
  const bottom = m.t + plotH;
  xs.forEach((x, j) => {
    const at = (m.l + (plotW * (j + 0.5)) / xs.length).toFixed(1);
    if (j % step(xs.length, plotW)) return;
    grid.append(el("path", { d: `M${at},${m.t}v${plotH}` }));
    lines.append(el("path", { d: `M${at},${bottom + 1}v5`, stroke: TICK }));
    const label = { class: "xt", y: bottom + 20.4, "text-anchor": "middle", transform: `translate(${at},0)` };
    labels.append(el("text", label, plain(x)));
  });
  ys.forEach((y, i) => {
    const at = m.t + (plotH * (i + 0.5)) / ys.length;
    if (i % step(ys.length, plotH)) return;
    grid.append(el("path", { d: `M${m.l},${at.toFixed(2)}h${plotW}` }));
    lines.append(el("path", { d: `M${m.l - 1},${at.toFixed(2)}h-5`, stroke: TICK }));
    labels.append(
      el("text", { class: "yt", x: m.l - 8.4, y: (at + 4.2).toFixed(2), "text-anchor": "end" }, plain(y)),
    );
  });
  lines.append(el("path", { d: `M${m.l - 1},${bottom + 0.5}H${m.l + plotW}M${m.l - 0.5},${m.t}V${bottom}` }));

  // colour bar: the gradient at Plotly's stops, outlined, with its ticks and rotated title
  const barX = Math.round(m.l + plotW * (1 + CB.gap) + CB.pad),
    barTop = m.t + CB.pad,
    barH = plotH - 2 * CB.pad;
  const id = `quick-cb-${Math.random().toString(36).slice(2)}`;
  const gradient = el("linearGradient", { id, x1: 0, y1: 1, x2: 0, y2: 0 });
  for (const [s] of scaleStops(t.colorscale, Boolean(t.reversescale))) {
    const z = t.zmin + s * (t.zmax - t.zmin);
    gradient.append(el("stop", { offset: s, "stop-color": `rgb(${paint(z)})` }));
  }
  const bar = el("g", {});
  bar.append(
    el("defs", {}),
    el("rect", {
      class: "bar",
      x: barX,
      y: barTop,
      width: CB.thick,
      height: barH,
      fill: `url(#${id})`,
      stroke: TICK,
      "stroke-width": 1,
    }),
  );
  bar.firstChild!.appendChild(gradient);
  const dtick = tickStep(t.zmax - t.zmin, barH);
  for (let v = Math.ceil(t.zmin / dtick) * dtick; v <= t.zmax + 1e-9 * dtick; v += dtick) {
    const y = barTop + barH - ((v - t.zmin) / (t.zmax - t.zmin)) * barH + 4.2;
    bar.append(
      el(
        "text",
        { class: "cbtick", x: barX + CB.thick + CB.labelOff, y: y.toFixed(2), "font-size": 12, fill: colour },
        String(+v.toPrecision(12)),
      ),
    );
  }
  const cx = barX + CB.thick + CB.titleOff,
    cy = m.t + plotH / 2;
  const title = el("text", {
    class: "cbtitle",
    "font-size": 14,
    fill: colour,
    "text-anchor": "middle",
    transform: `rotate(-90,${cx},${cy})`,
  });
  plain(t.colorbar?.title?.text ?? "")
    .split("\n")
    .forEach((line, k) => title.append(el("tspan", { x: cx, y: cy, dy: `${k * LINE_SPACING}em` }, line)));
  bar.append(title);

  svg.append(grid, cells, texts, lines, labels, bar);
  return svg;
}
