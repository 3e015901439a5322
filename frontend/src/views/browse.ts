// Browse: every analysis with kind, models, status and live progress; filter and open.
import { get, progressOf, type AnalysisOut, type Checkpoint } from "../api";
import type { Context } from "../context";
import { h } from "../dom";
import { withState } from "../state";
import { viewOf } from "./analysis";

export async function renderBrowse(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  root.append(h("div", { class: "loading" }, "Loading analyses…"));
  const filter = h("input", {
    type: "search",
    placeholder: "filter by model, kind or status",
    value: state.filter,
    "aria-label": "filter analyses",
  });
  const body = h("tbody");
  const table = h(
    "table",
    {},
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", {}, "analysis"),
        h("th", {}, "kind"),
        h("th", {}, "checkpoints"),
        h("th", {}, "status"),
        h("th", {}, "created"),
      ),
    ),
    body,
  );
  let analyses: AnalysisOut[] = [];
  let names = new Map<string, string>();
  const refresh = async () => {
    const [list, checkpoints] = await Promise.all([
      get<AnalysisOut[]>("/api/analyses"),
      get<Checkpoint[]>("/api/checkpoints"),
    ]);
    if (!ctx.alive()) return;
    analyses = list;
    names = new Map(checkpoints.map((c) => [c.id, c.name]));
    draw();
    if (analyses.some((a) => a.status === "queued" || a.status === "running"))
      setTimeout(() => ctx.alive() && refresh(), 1000);
  };
  const draw = () => {
    const needle = state.filter.toLowerCase();
    const rows = analyses
      .slice()
      .reverse()
      .filter((a) => {
        const text =
          `${a.id} ${a.kind} ${a.status} ${a.checkpoints.map((c) => names.get(c) ?? c).join(" ")}`.toLowerCase();
        return !needle || text.includes(needle);
      });
    body.replaceChildren(
      ...rows.map((a) => {
        const open = () =>
          ctx.navigate(withState(state, { view: viewOf(a.kind), analysis: a.id, filter: "" }));
        const eta = progressOf(a)?.eta_s;
        const status =
          a.status === "running" || a.status === "queued"
            ? h(
                "span",
                {},
                h("progress", { max: 1, value: a.progress, "aria-label": `progress of ${a.id}` }),
                ` ${Math.round(100 * a.progress)}%`,
                eta ? h("span", { class: "muted" }, ` · ${Math.ceil(eta)} s left`) : null,
              )
            : h(
                "span",
                { class: `status ${a.status}` },
                a.status,
                a.error ? h("span", { class: "muted" }, ` — ${a.error.message}`) : null,
              );
        return h(
          "tr",
          {
            class: "row-link",
            tabindex: 0,
            "data-analysis": a.id,
            onclick: open,
            onkeydown: (e: Event) => (e as KeyboardEvent).key === "Enter" && open(),
          },
          h("td", {}, h("a", { href: `/analyses/${a.id}`, "data-link": true }, a.id)),
          h("td", {}, a.kind),
          h("td", {}, a.checkpoints.map((c) => names.get(c) ?? c).join(" → ")),
          h("td", { "data-status": a.status }, status),
          h("td", { class: "muted" }, new Date(a.created_at).toLocaleString()),
        );
      }),
    );
    if (!rows.length)
      body.append(
        h(
          "tr",
          {},
          h(
            "td",
            { colspan: 5, class: "muted" },
            analyses.length ? "No analysis matches." : "No analyses yet — start one under New analysis.",
          ),
        ),
      );
  };
  filter.addEventListener("input", () => {
    state.filter = filter.value;
    ctx.remember(state);
    draw();
  });
  await refresh();
  if (!ctx.alive()) return;
  root.replaceChildren(
    h("h1", {}, "Analyses"),
    h("div", { class: "controls" }, filter, h("a", { href: "/new", "data-link": true }, "+ New analysis")),
    table,
  );
  filter.focus();
}
