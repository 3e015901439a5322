// One matrix in detail: its changed count and sparsity at the page's τ, update map, row / column / head
// profiles, |Δ| histogram with τ marked, singular spectrum with rank and energy ranks; the same matrix
// one layer up or down and its siblings in the layer one click away; the mask export.
import { get, type TensorDetail, type TensorRow } from "../api";
import {
  changedAbove,
  histogramFigure,
  layerLabel,
  nearestEdge,
  profileFigure,
  spectrumFigure,
  updateMapFigure,
} from "../charts";
import type { Context } from "../context";
import { card, h, panel } from "../dom";
import { csvForTables } from "../export";
import { int, pct, sci, tauText } from "../format";
import { maskExport } from "../mask";
import { layerNeighbours, uniqueLabels } from "../names";
import { plotInto } from "../plot";
import { withState, type ViewState } from "../state";
import { geometryFigures } from "./geometry";
import { floorCaption, precisionFigures, withVisibilityFloor } from "./precision";

export async function renderTensor(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const id = state.analysis!;
  const [t, all] = await Promise.all([
    get<TensorDetail>(
      `/api/analyses/${id}/tensors/${state.tensor!.split("/").map(encodeURIComponent).join("/")}`,
    ),
    get<TensorRow[]>(`/api/analyses/${id}/tensors`),
  ]);
  if (!ctx.alive()) return;
  const go = (name: string) => ctx.navigate(withState(state, { tensor: name }));
  const { prev, next, inLayers } = layerNeighbours(all, t);
  const neighbour = (row: TensorRow | undefined, label: string, key: string) =>
    h(
      "button",
      { type: "button", disabled: !row, "data-nav": key, onclick: () => row && go(row.name) },
      label,
    );
  const siblings = all.filter((r) => r.layer === t.layer && r.name !== t.name);
  const labels = uniqueLabels([t.name, ...siblings.map((r) => r.name)]).slice(1);
  const counts = t.histograms[state.mode] ?? [];
  const edges = t.bin_edges;
  const at = changedAt(t, state);
  root.replaceChildren(
    h("p", {}, h("a", { href: `/analyses/${id}`, "data-link": true }, "← overview")),
    h("h1", { id: "tensor-name" }, t.name),
    h(
      "p",
      { class: "muted" },
      `${layerLabel(t.layer)} · ${t.block} · ${t.matrix} · shape ${t.shape.join(" × ")} · ${int(t.numel)} weights`,
    ),
    h(
      "div",
      { class: "controls" },
      ...(inLayers
        ? [
            neighbour(prev, prev ? `← ${layerLabel(prev.layer)}` : "first layer", "prev"),
            neighbour(next, next ? `${layerLabel(next.layer)} →` : "last layer", "next"),
          ]
        : []),
      h("span", { class: "muted" }, t.layer === null ? "outside the layers:" : "same layer:"),
      ...siblings.map((r, i) =>
        h(
          "button",
          { type: "button", "data-sibling": r.name, onclick: () => go(r.name), title: r.name },
          labels[i],
        ),
      ),
    ),
    h(
      "div",
      { class: "controls" },
      maskExport(
        id,
        () => state.tau,
        () => state.mode === "rel",
      ),
      h("span", { class: "muted" }, "the whole model's update mask at this page's τ"),
    ),
    h(
      "div",
      { class: "cards" },
      card(`changed at τ = ${at ? tauText(at.tau) : "–"}`, int(at?.count), "tensor-changed"),
      card("sparsity at τ (share unchanged)", pct(at ? 1 - at.count / t.numel : null), "tensor-sparsity"),
      card("rank of ΔW", t.rank === null ? "–" : `${t.rank} / ${t.full_rank}`),
      card("rank % of full", t.rank_pct === null ? "–" : `${t.rank_pct.toFixed(1)}%`),
      card("effective rank", t.effective_rank === null ? "–" : t.effective_rank.toFixed(1)),
      card("‖Δ‖ / ‖W‖", sci((t.norm_delta ?? 0) / (t.norm_base || 1))),
      card("bit-identical weights", pct(counts.length ? counts[0] / t.numel : null)),
    ),
  );
  const grid = h("div", { class: "grid2" });
  root.append(grid);
  const map = t.update_map;
  if (map) {
    const mapPanel = panel(grid, `Update map at τ = ${tauText(map.tau)} (share changed per cell)`);
    mapPanel.id = "update-map";
    if (at && map.tau !== at.tau)
      mapPanel.append(
        h(
          "p",
          { class: "muted caption", id: "update-map-tau" },
          `The worker stores this map at the analysis's first τ (${tauText(map.tau)}, its mode) only; ` +
            `the counts above are at this page's τ (${tauText(at.tau)}).`,
        ),
      );
    plotInto(mapPanel, updateMapFigure(map, t.shape), "update map");
    const profiles = panel(grid, `Profiles at τ = ${tauText(map.tau)}`);
    const [rows, cols] = t.shape;
    plotInto(profiles, profileFigure(map.row_frac, "row", rows), "changed share per row");
    plotInto(profiles, profileFigure(map.col_frac, "column", cols), "changed share per column");
    if (map.head_frac) plotInto(profiles, profileFigure(map.head_frac, "head"), "changed share per head");
  }
  const floor = state.mode === "rel" ? t.ulp_histogram?.visibility_floor : undefined;
  const dtype = t.ulp_histogram?.dtype ?? t.dtype;
  if (counts.length) {
    const histPanel = panel(grid, "Histogram of |Δ|" + (state.mode === "rel" ? "/|W|" : ""));
    plotInto(
      histPanel,
      withVisibilityFloor(
        histogramFigure(counts, edges, state.tau, state.mode === "rel" ? "|Δ|/|W|" : "|Δ|"),
        floor,
        dtype,
      ),
      "histogram of weight changes",
    );
    if (floor) histPanel.append(floorCaption(floor, dtype));
  }
  if (t.spectrum) plotInto(panel(grid, "Singular spectrum of ΔW"), spectrumFigure(t), "singular values");
  precisionFigures(grid, t);
  geometryFigures(grid, t.geometry);
  csvForTables(root);
}

/** The matrix's changed count at the page's τ: the exact stored count when τ is one the analysis was
 * asked for (in this mode), else from its histogram at the nearest edge (what the overview's slider
 * shows). Null when the mode has no histogram. */
function changedAt(t: TensorDetail, state: ViewState): { tau: number; count: number } | null {
  const exact = t.changed.find((c) => c.mode === state.mode && c.tau === state.tau);
  if (exact) return exact;
  const hist = t.histograms[state.mode];
  if (!hist) return null;
  const k = nearestEdge(t.bin_edges, state.tau);
  return { tau: k < 0 ? 0 : t.bin_edges[k], count: changedAbove(hist, k) };
}
