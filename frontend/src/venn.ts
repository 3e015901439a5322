// The Venn diagram of 2–3 update masks: circle areas proportional to the counts, each run's label
// outside every circle in a slot of its own (left/right, or top-left/top-right/bottom) with a leader
// line to its circle, so labels never overlap; the regions are named in words in a table beside it.
import { circleDistance, type Figure, plotlyText } from "./charts";
import { count } from "./format";

export const RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c"];

type Point = [number, number];

/** Label slots (angles in degrees): two runs left and right, three in a triangle around the circles. */
const SLOTS: Record<number, number[]> = { 2: [180, 0], 3: [150, 30, 270] };

function permutations<T>(xs: T[]): T[][] {
  if (xs.length <= 1) return [xs];
  return xs.flatMap((x, i) => permutations([...xs.slice(0, i), ...xs.slice(i + 1)]).map((p) => [x, ...p]));
}

const angleGap = (a: number, b: number) => {
  const d = Math.abs(a - b) % 360;
  return Math.min(d, 360 - d);
};

/** Per circle, the slot angle whose direction from the centroid is nearest its own (fewest crossings). */
export function labelAngles(centers: Point[]): number[] {
  const slots = SLOTS[centers.length];
  const g = centroid(centers);
  const own = centers.map(([x, y]) => (Math.atan2(y - g[1], x - g[0]) * 180) / Math.PI);
  let best = slots,
    cost = Infinity;
  for (const p of permutations(slots)) {
    const c = p.reduce((s, a, i) => s + angleGap(a, own[i]), 0);
    if (c < cost) [best, cost] = [p, c];
  }
  return best;
}

const centroid = (pts: Point[]): Point => [
  pts.reduce((s, p) => s + p[0], 0) / pts.length,
  pts.reduce((s, p) => s + p[1], 0) / pts.length,
];

/** Circle centres (run 0 at the origin, run 1 on the x axis) whose lenses have the pairs' overlaps. */
export function vennCenters(changed: number[], both: (a: number, b: number) => number): Point[] {
  const d01 = circleDistance(changed[0], changed[1], both(0, 1));
  const centers: Point[] = [
    [0, 0],
    [d01, 0],
  ];
  if (changed.length === 3) {
    const d02 = circleDistance(changed[0], changed[2], both(0, 2)),
      d12 = circleDistance(changed[1], changed[2], both(1, 2));
    const x = d01 ? (d02 * d02 - d12 * d12 + d01 * d01) / (2 * d01) : 0;
    centers.push([x, -Math.sqrt(Math.max(0, d02 * d02 - x * x))]);
  }
  return centers;
}

/** Venn regions (membership bits) in reading order: single runs first, then pairs, then all three. */
export const regionOrder = (regions: string[]) =>
  [...regions].sort((a, b) => ones(a) - ones(b) || b.localeCompare(a));
const ones = (bits: string) => [...bits].filter((c) => c === "1").length;

/** A Venn region (membership bits in run order, e.g. "101") in words: "A and C, not B". */
export function regionName(bits: string, names: string[]): string {
  const inside = names.filter((_, k) => bits[k] === "1"),
    outside = names.filter((_, k) => bits[k] !== "1");
  if (inside.length === 1) return `only ${inside[0]}`;
  if (!outside.length)
    return inside.length === 2 ? `both ${inside.join(" and ")}` : `all of ${inside.join(", ")}`;
  return `${inside.join(" and ")}, not ${outside.join(" or ")}`;
}

export function vennFigure(
  names: string[],
  changed: number[],
  both: (a: number, b: number) => number,
): Figure {
  const radius = changed.map((c) => Math.sqrt(Math.max(c, 0) / Math.PI));
  const centers = vennCenters(changed, both);
  const g = centroid(centers);
  const reach = Math.max(...centers.map(([x, y], i) => Math.hypot(x - g[0], y - g[1]) + radius[i]), 1e-9);
  const out = reach * 1.35; // label distance from the centroid: beyond every circle
  const angles = labelAngles(centers).map((a) => (a * Math.PI) / 180);
  const shapes = centers.map(([x, y], i) => ({
    type: "circle",
    xref: "x",
    yref: "y",
    x0: x - radius[i],
    x1: x + radius[i],
    y0: y - radius[i],
    y1: y + radius[i],
    fillcolor: RUN_COLORS[i],
    opacity: 0.35,
    line: { color: RUN_COLORS[i], width: 2 },
  }));
  const annotations = centers.map(([x, y], i) => {
    const [ux, uy] = [Math.cos(angles[i]), Math.sin(angles[i])];
    const [lx, ly] = [g[0] + out * ux, g[1] + out * uy];
    // the leader line ends on the circle, on the side facing its label
    const toward = Math.atan2(ly - y, lx - x);
    return {
      x: x + radius[i] * Math.cos(toward),
      y: y + radius[i] * Math.sin(toward),
      ax: lx,
      ay: ly,
      axref: "x",
      ayref: "y",
      showarrow: true,
      arrowhead: 0,
      arrowwidth: 1.5,
      arrowcolor: RUN_COLORS[i],
      text: `<b>${plotlyText(names[i])}</b><br>${count(changed[i])} changed`,
      font: { size: 12 },
      borderpad: 2,
    };
  });
  const half = out * 1.25;
  return {
    data: [],
    layout: {
      shapes,
      annotations,
      height: 400,
      margin: { l: 10, r: 10, t: 10, b: 10 },
      showlegend: false,
      xaxis: { visible: false, range: [g[0] - half, g[0] + half] },
      yaxis: { visible: false, range: [g[1] - half, g[1] + half], scaleanchor: "x" },
    },
  };
}
