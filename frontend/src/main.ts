// The dashboard shell: routing from the URL, navigation, theme, copy link. Views live in views/.
import "./style.css";
import { post, type LinkIn, type LinkOut } from "./api";
import type { Context, Renderer } from "./context";
import { h } from "./dom";
import { format, parse, type View, type ViewState } from "./state";
import { toast } from "./toast";
import { renderBrowse } from "./views/browse";
import { renderCompare } from "./views/compare";
import { renderNew } from "./views/new";
import { renderOverlap } from "./views/overlap";
import { renderPair } from "./views/pair";
import { renderSeries } from "./views/series";
import { renderTensor } from "./views/tensor";

/** state.view -> the view drawing it ("overview" is a pair analysis' overview). */
const VIEWS: Record<View, Renderer> = {
  browse: renderBrowse,
  new: renderNew,
  overview: renderPair,
  series: renderSeries,
  overlap: renderOverlap,
  tensor: renderTensor,
  compare: renderCompare,
};

const root = document.getElementById("app")!;
let generation = 0;

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
  VIEWS[state.view](ctx).catch((e: Error) => {
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
