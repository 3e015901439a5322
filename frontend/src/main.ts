// The dashboard shell: routing from the URL, navigation, theme, copy link. Views live in views/.
import "./style.css";
import { getAhead, post, type LinkIn, type LinkOut } from "./api";
import type { Context, Renderer } from "./context";
import { h } from "./dom";
import { watchDemo } from "./demo";
import { overviewPaths } from "./prefetch";
import { format, parse, type View, type ViewState } from "./state";
import { toast } from "./toast";

/** state.view -> the view drawing it ("overview" is a pair analysis' overview). Each is a chunk of its
 * own, loaded on first use, so a page fetches and compiles only the code it draws with. */
const VIEWS: Record<View, () => Promise<Renderer>> = {
  browse: () => import("./views/browse").then((m) => m.renderBrowse),
  new: () => import("./views/new").then((m) => m.renderNew),
  overview: () => import("./views/pair").then((m) => m.renderPair),
  series: () => import("./views/series").then((m) => m.renderSeries),
  overlap: () => import("./views/overlap").then((m) => m.renderOverlap),
  tensor: () => import("./views/tensor").then((m) => m.renderTensor),
  compare: () => import("./views/compare").then((m) => m.renderCompare),
};

/** Views that start from their analysis' status (views/analysis.ts): asked for with the view's code. */
const FROM_STATUS = new Set<View>(["overview", "series", "overlap"]);
/** Views that plot without a quick heatmap first (plot.ts): Plotly (src/plotly.ts, the largest chunk)
 * is asked for with the view's code, not once that code has loaded. The overview loads it once its
 * heatmap has been painted. */
const PLOTS = new Set<View>(["series", "overlap", "tensor", "compare"]);

/** The requests a view starts with, asked for with its code; a redraw of the same page (an unfinished
 * analysis polling its status) asks for the status only. */
function requestsAhead(state: ViewState, redraw: boolean): string[] {
  const status = FROM_STATUS.has(state.view) ? [`/api/analyses/${state.analysis}`] : [];
  return state.view === "overview" && !redraw ? [...status, ...Object.values(overviewPaths(state))] : status;
}

const root = document.getElementById("app")!;
let generation = 0;
let shown = ""; // the URL last rendered

function navigate(state: ViewState, replace = false): void {
  const url = format(state);
  if (url !== location.pathname + location.search) {
    if (replace) history.replaceState(null, "", url);
    else history.pushState(null, "", url);
  }
  render();
}

function render(): void {
  const state = parse(location.pathname, location.search);
  const mine = ++generation;
  const remember = (next: ViewState) => history.replaceState(null, "", format(next));
  const ctx: Context = { state, root, navigate, remember, alive: () => mine === generation };
  root.replaceChildren();
  const loading = VIEWS[state.view](); // first: its chunks before the requests on the browser's 6 connections
  const url = location.pathname + location.search;
  getAhead(requestsAhead(state, url === shown));
  shown = url;
  if (PLOTS.has(state.view)) import("./plotly").catch(() => undefined); // plot.ts reports a failure
  loading
    .then((view) => (ctx.alive() ? view(ctx) : undefined)) // not if the user moved on meanwhile
    .catch((e: Error) => {
      if (ctx.alive())
        root.replaceChildren(
          h("div", { class: "error", role: "alert" }, `Could not load this view: ${e.message}`),
        );
    });
  document
    .querySelectorAll("nav a")
    .forEach((a) =>
      a.toggleAttribute("aria-current", (a as HTMLAnchorElement).pathname === location.pathname),
    );
}

document.addEventListener("click", (e) => {
  const a = (e.target as HTMLElement).closest("a[data-link]") as HTMLAnchorElement | null;
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey || a.origin !== location.origin) return;
  e.preventDefault();
  history.pushState(null, "", a.pathname + a.search);
  render();
});
window.addEventListener("popstate", render);

document.getElementById("copy-link")!.addEventListener("click", async () => {
  const full = location.href;
  let short = "";
  try {
    const link: LinkIn = { url: location.pathname + location.search };
    // relative (/s/<code>) unless the server has DELTALENS_PUBLIC_URL: complete it with this origin
    short = new URL((await post<LinkOut>("/api/links", link)).short_url, location.origin).href;
  } catch {
    /* the full link still works */
  }
  const text = short ? `${full}\n${short}` : full;
  try {
    await navigator.clipboard.writeText(full);
  } catch {
    /* clipboard needs a secure context; the link is shown below */
  }
  document.body.dataset.lastLink = full;
  document.body.dataset.shortLink = short;
  toast(`Copied: ${text.replace("\n", "  ·  short: ")}`);
});

const applyTheme = (dark: boolean) => {
  document.documentElement.classList.toggle("dark", dark);
  localStorage.setItem("deltalens-theme", dark ? "dark" : "light");
};
const savedTheme = localStorage.getItem("deltalens-theme");
applyTheme(
  (savedTheme ?? (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light")) === "dark",
);
document.getElementById("theme")!.addEventListener("click", () => {
  applyTheme(!document.documentElement.classList.contains("dark"));
  render();
});

render();
void watchDemo(); // the banner while `up --demo` trains the demo models
