// What a view asks the API for first, from its state alone: main.ts starts these requests with the
// view's code (api.ts getAhead), and the view takes them by the same paths.
import type { ViewState } from "./state";

/** The pair overview's requests (views/pair.ts), besides its analysis' status. */
export function overviewPaths(s: ViewState) {
  const a = `/api/analyses/${s.analysis}`;
  return {
    summary: `${a}/summary`,
    cube: `${a}/heatmap-cube?mode=${s.mode}`,
    curve: `${a}/sparsity-curve?mode=${s.mode}`,
    heat: `${a}/heatmap?metric=${s.metric}&tau=${s.tau}&mode=${s.mode}`,
    checkpoints: "/api/checkpoints",
    tensors: `${a}/tensors`,
  };
}
