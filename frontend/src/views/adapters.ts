// Panels of the pair overview that say how the inputs were read: the exact ΔW of a LoRA adapter
// input (before its merged weights are rounded to the base dtype) and the readers' notes.
import type { PairSummary } from "../api";
import { h } from "../dom";
import { int, pct, sci } from "../format";

type Adapter = NonNullable<PairSummary["adapters"]>[number];

const NUM = { class: "num" };

/** One table per LoRA input: every adapted module's exact ΔW = scale·B·A at the first τ. */
export function adapterPanels(summary: PairSummary): HTMLElement[] {
  return (summary.adapters ?? []).map((a: Adapter) => {
    const tau = a.modules[0]?.changed[0]?.tau ?? summary.taus[0];
    return h(
      "section",
      { class: "panel", id: "adapter-figures" },
      h("h2", {}, `LoRA adapter: exact ΔW = ${a.use_rslora ? "(α/√r)" : "(α/r)"}·B·A`),
      h(
        "p",
        { class: "muted" },
        `${a.adapter} · r = ${a.r}, α = ${a.alpha} · the overview above counts the merged weights as ` +
          `stored in the base dtype; this table counts the exact float64 ΔW of each adapted module, ` +
          `which rounding can hide.` +
          (a.replaced.length ? ` Saved whole: ${a.replaced.join(", ")}.` : ""),
      ),
      h(
        "table",
        {},
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "module"),
            h("th", NUM, "r"),
            h("th", NUM, "scale"),
            h("th", NUM, `|ΔW| > ${sci(tau)}`),
            h("th", NUM, "share"),
            h("th", NUM, "‖ΔW‖"),
            h("th", NUM, "rank"),
          ),
        ),
        h(
          "tbody",
          {},
          ...a.modules.map((m) => {
            const count = m.changed[0]?.count ?? 0;
            return h(
              "tr",
              {},
              h("td", {}, m.name),
              h("td", NUM, String(m.r)),
              h("td", NUM, m.scale.toPrecision(4)),
              h("td", NUM, int(count)),
              h("td", NUM, pct(m.numel ? count / m.numel : null)),
              h("td", NUM, sci(m.norm_delta)),
              h("td", NUM, m.rank === null || m.rank === undefined ? "–" : `${m.rank} / ${m.full_rank}`),
            );
          }),
        ),
      ),
    );
  });
}

/** The readers' notes (trainer state left out, --prefer, dequantized weights, ...), folded. */
export function readNotes(summary: PairSummary): HTMLElement[] {
  const notes = summary.notes ?? [];
  if (!notes.length) return [];
  return [
    h(
      "details",
      { class: "panel", id: "read-notes" },
      h("summary", {}, `How the inputs were read (${notes.length} note${notes.length > 1 ? "s" : ""})`),
      h("ul", {}, ...notes.map((n) => h("li", {}, n))),
    ),
  ];
}
