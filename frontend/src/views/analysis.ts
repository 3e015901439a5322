// What the pair, series and overlap views share: wait for the analysis to finish, and send the
// user to the view of its kind (a link to /analyses/<id> lands on the right one).
import { get, type AnalysisOut } from "../api";
import type { Context } from "../context";
import { h } from "../dom";
import { withState, type View } from "../state";

/** The view that shows an analysis of this kind. */
export const viewOf = (kind: AnalysisOut["kind"]): View => (kind === "pair" ? "overview" : kind);

/**
 * The analysis' status once it is done and this is the view for its kind; otherwise null, after
 * showing its progress (polling until it finishes) or redirecting to the right view.
 */
export async function finishedAnalysis(ctx: Context): Promise<AnalysisOut | null> {
  const { root, state } = ctx;
  root.append(h("div", { class: "loading" }, "Loading…"));
  const status = await get<AnalysisOut>(`/api/analyses/${state.analysis}`);
  if (!ctx.alive()) return null;
  if (status.status !== "done") {
    root.replaceChildren(
      h("h1", {}, `Analysis ${status.id}`),
      h(
        "p",
        {},
        h("span", { class: `status ${status.status}` }, status.status),
        " ",
        h("progress", { max: 1, value: status.progress }),
        ` ${Math.round(100 * status.progress)}%`,
      ),
      status.error
        ? h("div", { class: "error", role: "alert" }, `${status.error.code}: ${status.error.message}`)
        : "",
    );
    if (status.status === "queued" || status.status === "running")
      setTimeout(() => ctx.alive() && ctx.navigate(state, true), 1000);
    return null;
  }
  const view = viewOf(status.kind);
  if (state.view !== view) {
    ctx.navigate(withState(state, { view }), true);
    return null;
  }
  return status;
}
