// The dashboard shell: routing from the URL, navigation, theme, copy link.
import "./style.css";
import { post } from "./api";
import { format, parse, type ViewState } from "./state";
import { renderBrowse } from "./views/browse";
import { renderCompare } from "./views/compare";
import { renderNew } from "./views/new";
import { renderOverview } from "./views/overview";
import { renderTensor } from "./views/tensor";
import { h } from "./dom";

export interface Context {
  state: ViewState;
  root: HTMLElement;
  navigate: (state: ViewState, replace?: boolean) => void;
  remember: (state: ViewState) => void; // put the state in the URL without redrawing (slider moves)
  alive: () => boolean; // false once the user has moved to another view
}

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
  const views = { browse: renderBrowse, new: renderNew, compare: renderCompare, tensor: renderTensor,
                  overview: renderOverview, series: renderOverview, overlap: renderOverview };
  views[state.view](ctx).catch((e: Error) => {
    if (ctx.alive()) root.replaceChildren(h("div", { class: "error", role: "alert" }, `Could not load this view: ${e.message}`));
  });
  document.querySelectorAll("nav a").forEach((a) => a.toggleAttribute("aria-current", (a as HTMLAnchorElement).pathname === location.pathname));
}

export function toast(message: string): void {
  const el = document.getElementById("toast")!;
  el.textContent = message;
  el.classList.add("show");
  setTimeout(() => el.classList.remove("show"), 2500);
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
    short = (await post<{ short_url: string }>("/api/links", { url: location.pathname + location.search })).short_url;
  } catch { /* the full link still works */ }
  const text = short ? `${full}\n${short}` : full;
  try {
    await navigator.clipboard.writeText(full);
  } catch { /* clipboard needs a secure context; the link is shown below */ }
  document.body.dataset.lastLink = full;
  document.body.dataset.shortLink = short;
  toast(`Copied: ${text.replace("\n", "  ·  short: ")}`);
});

const themeButton = document.getElementById("theme")!;
const applyTheme = (dark: boolean) => {
  document.documentElement.classList.toggle("dark", dark);
  localStorage.setItem("deltalens-theme", dark ? "dark" : "light");
};
applyTheme((localStorage.getItem("deltalens-theme") ?? (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light")) === "dark");
themeButton.addEventListener("click", () => {
  applyTheme(!document.documentElement.classList.contains("dark"));
  render();
});

render();
