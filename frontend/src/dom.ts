// A tiny element builder. Text always goes in as text nodes: tensor names and file names are
// data, never HTML.

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | EventListener | undefined>;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** A key-figure card: a big value over a small label. The value may be an element updated later. */
export const card = (label: string, value: string | HTMLElement, id?: string) =>
  h(
    "div",
    { class: "card" },
    typeof value === "string" ? h("div", { class: "value", id }, value) : value,
    h("div", { class: "label" }, label),
  );

/** A titled panel, appended to `parent`. */
export function panel(parent: HTMLElement, title: string): HTMLElement {
  const p = h("section", { class: "panel" }, h("h2", {}, title));
  parent.append(p);
  return p;
}
