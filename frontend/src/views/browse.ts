// Browse: every analysis with its title, kind, models, headline figure, status and live progress;
// filter, open, rename, delete.
import {
  del,
  get,
  patch,
  progressOf,
  type AnalysisOut,
  type AnalysisRename,
  type Checkpoint,
  type Headline,
} from "../api";
import type { Context } from "../context";
import { h } from "../dom";
import { pct, tauText } from "../format";
import { withState } from "../state";
import { viewOf } from "./analysis";

const MAX_TITLE = 200; // the server's limit (ServerConfig.max_title); it answers 422 beyond
const CONFIRM_MS = 4000; // a first click on Delete arms it for this long

const stay = (e: Event) => e.stopPropagation(); // clicks and keys in a row's forms do not open it

/** The headline figure of each kind, as short text and as what it means (the cell's tooltip). */
const HEADLINES: Record<Headline["metric"], (x: Headline) => [string, string]> = {
  sparsity: (x) => [
    `sparsity ${pct(x.value, 1)}`,
    `weights unchanged at τ = ${tauText(x.tau)}${x.relative ? " (relative)" : ""}`,
  ],
  transient_share: (x) => [
    `transient ${pct(x.value, 1)}`,
    `weights moved at some checkpoint but not in the final one (τ = ${tauText(x.tau)})`,
  ],
  overlap_o1: (x) => [
    `o1 ${pct(x.value, 1)} vs random ${pct(x.baseline, 1)}`,
    `share of run A's changed weights also changed in run B, against a random mask's (τ = ${tauText(x.tau)})`,
  ],
};

function headline(a: AnalysisOut): HTMLElement {
  if (!a.headline) return h("td", { class: "num muted" }, "–");
  const [text, meaning] = HEADLINES[a.headline.metric](a.headline);
  return h("td", { class: "num headline", title: meaning }, text);
}

function statusOf(a: AnalysisOut): HTMLElement {
  if (a.status === "running" || a.status === "queued") {
    const eta = progressOf(a)?.eta_s;
    return h(
      "span",
      {},
      h("progress", { max: 1, value: a.progress, "aria-label": `progress of ${a.title}` }),
      ` ${Math.round(100 * a.progress)}%`,
      eta ? h("span", { class: "muted" }, ` · ${Math.ceil(eta)} s left`) : null,
    );
  }
  return h(
    "span",
    { class: `status ${a.status}` },
    a.status,
    a.error ? h("span", { class: "muted failure" }, ` — ${a.error.message}`) : null,
  );
}

export async function renderBrowse(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  root.append(h("div", { class: "loading" }, "Loading analyses…"));
  const filter = h("input", {
    type: "search",
    placeholder: "filter by title, model, kind or status",
    value: state.filter,
    "aria-label": "filter analyses",
  });
  const message = h("div", { role: "status", id: "browse-message" });
  const columns = ["analysis", "kind", "checkpoints", "headline", "status", "created", ""];
  const numeric = new Set(["headline"]);
  const body = h("tbody");
  const table = h(
    "table",
    { class: "analyses" },
    h(
      "thead",
      {},
      h("tr", {}, ...columns.map((c) => h("th", { class: numeric.has(c) ? "num" : undefined }, c))),
    ),
    body,
  );
  let analyses: AnalysisOut[] = [];
  let names = new Map<string, string>();
  let editing: string | null = null; // the analysis whose title is being edited: no redraw meanwhile
  let armed: string | null = null; // the analysis whose Delete was clicked once (kept across redraws)
  const nameOf = (c: string) => names.get(c) ?? c;
  const refresh = async () => {
    const [list, checkpoints] = await Promise.all([
      get<AnalysisOut[]>("/api/analyses"),
      get<Checkpoint[]>("/api/checkpoints"),
    ]);
    if (!ctx.alive()) return;
    analyses = list;
    names = new Map(checkpoints.map((c) => [c.id, c.name]));
    if (!editing) draw();
    if (analyses.some((a) => a.status === "queued" || a.status === "running"))
      setTimeout(() => ctx.alive() && refresh(), 1000);
  };
  const failed = (e: unknown) =>
    message.replaceChildren(h("div", { class: "error", role: "alert" }, (e as Error).message));

  /** The title cell turned into a form: Enter or Save renames, Escape or Cancel leaves it. */
  const editTitle = (a: AnalysisOut, cell: HTMLElement) => {
    editing = a.id;
    const input = h("input", {
      type: "text",
      value: a.title,
      maxlength: MAX_TITLE,
      "aria-label": `new title of ${a.title}`,
      class: "title-input",
    });
    const done = () => {
      editing = null;
      draw();
    };
    const save = async () => {
      try {
        const body: AnalysisRename = { title: input.value };
        const renamed = await patch<AnalysisOut>(`/api/analyses/${a.id}`, body);
        analyses = analyses.map((x) => (x.id === a.id ? renamed : x));
        message.replaceChildren();
        done();
      } catch (e) {
        failed(e);
        input.focus();
      }
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") save();
      else if (e.key === "Escape") done();
    });
    cell.replaceChildren(
      h(
        "span",
        { class: "rename", onclick: stay, onkeydown: stay },
        input,
        h("button", { type: "button", onclick: save }, "Save"),
        h("button", { type: "button", onclick: done }, "Cancel"),
      ),
    );
    input.select();
  };

  /** Delete needs two clicks: the first arms the button for a few seconds. */
  const deleteButton = (a: AnalysisOut) =>
    h(
      "button",
      {
        type: "button",
        class: "danger",
        "aria-label": `delete ${a.title}`,
        onclick: async () => {
          if (armed !== a.id) {
            armed = a.id;
            draw();
            setTimeout(() => {
              if (armed !== a.id) return;
              armed = null;
              if (!editing) draw();
            }, CONFIRM_MS);
            return;
          }
          try {
            await del(`/api/analyses/${a.id}`);
            analyses = analyses.filter((x) => x.id !== a.id);
            message.replaceChildren(h("span", { class: "status done" }, `Deleted: ${a.title}`));
            draw();
          } catch (e) {
            failed(e);
          }
        },
      },
      armed === a.id ? "Confirm delete" : "Delete",
    );

  const row = (a: AnalysisOut) => {
    const open = () => ctx.navigate(withState(state, { view: viewOf(a.kind), analysis: a.id, filter: "" }));
    const title = h(
      "td",
      {},
      h("a", { href: `/analyses/${a.id}`, "data-link": true, class: "title" }, a.title),
      h("div", { class: "muted small" }, a.id),
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
      title,
      h("td", {}, a.kind),
      h("td", { class: "checkpoints" }, a.checkpoints.map(nameOf).join(" → ")),
      headline(a),
      h("td", { "data-status": a.status }, statusOf(a)),
      h("td", { class: "muted" }, new Date(a.created_at).toLocaleString()),
      h(
        "td",
        { class: "actions", onclick: stay, onkeydown: stay },
        h(
          "button",
          { type: "button", "aria-label": `rename ${a.title}`, onclick: () => editTitle(a, title) },
          "Rename",
        ),
        deleteButton(a),
      ),
    );
  };

  const draw = () => {
    editing = null; // a redraw (filter, delete) drops an open title editor: refreshes resume
    const needle = state.filter.toLowerCase();
    const rows = analyses
      .slice()
      .reverse()
      .filter((a) => {
        const text = `${a.title} ${a.id} ${a.kind} ${a.status} ${a.checkpoints.map(nameOf).join(" ")}`;
        return !needle || text.toLowerCase().includes(needle);
      });
    body.replaceChildren(...rows.map(row));
    if (!rows.length)
      body.append(
        h(
          "tr",
          {},
          h(
            "td",
            { colspan: columns.length, class: "muted" },
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
    message,
    table,
  );
  filter.focus();
}
