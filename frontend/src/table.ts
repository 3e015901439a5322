// A data table for many rows: sortable (click a header; aria-sort), searchable (a filter box), keyboard
// navigable (arrow keys move the active row, Enter opens it), exported as CSV as filtered and sorted.
// Only the rows in view are in the DOM (fixed row height, spacers above and below), so 10 000 rows scroll
// as lightly as 10.
import { h } from "./dom";
import { csvButton, type Cell } from "./export";

export interface Column<R> {
  key: string; // the sort key in the URL
  label: string;
  value: (row: R) => number | string | null; // what sorts and what CSV holds
  text?: (row: R) => string; // what the cell shows (default: the value)
  title?: string; // the header's tooltip
}

export interface TableOptions<R> {
  id: string;
  label: string; // accessible name and CSV file name
  columns: Column<R>[];
  rows: R[];
  name: (row: R) => string; // the first column's link text, what the filter searches
  href: (row: R) => string;
  open: (row: R) => void;
  sort: string; // "key" ascending, "-key" descending, "" as given
  filter: string;
  onState: (sort: string, filter: string) => void; // sort or filter changed (put them in the URL)
}

const ROW_HEIGHT = 30; // px, fixed in style.css (.data-table tr)
const OVERSCAN = 12;

/** Null last whatever the direction; numbers before text. */
export function compareCells(a: number | string | null, b: number | string | null): number {
  if (a === b) return 0;
  if (a === null) return 1;
  if (b === null) return -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), "en", { numeric: true });
}

/** Rows whose text holds every whitespace-separated term of `filter` (case-insensitive). */
export function filterRows<R>(rows: R[], filter: string, text: (row: R) => string): R[] {
  const terms = filter.toLowerCase().split(/\s+/).filter(Boolean);
  if (!terms.length) return rows;
  return rows.filter((r) => {
    const t = text(r).toLowerCase();
    return terms.every((term) => t.includes(term));
  });
}

/** Rows ordered by a sort key ("key" or "-key"; stable; nulls last either way). */
export function sortRows<R>(rows: R[], sort: string, columns: Column<R>[]): R[] {
  const column = columns.find((c) => c.key === sort.replace(/^-/, ""));
  if (!column) return rows;
  const sign = sort.startsWith("-") ? -1 : 1;
  return rows
    .map((row, i) => ({ row, i, v: column.value(row) }))
    .sort((a, b) => {
      if (a.v === null || b.v === null) return compareCells(a.v, b.v) || a.i - b.i;
      return sign * compareCells(a.v, b.v) || a.i - b.i;
    })
    .map((x) => x.row);
}

export function dataTable<R>(o: TableOptions<R>): { el: HTMLElement; refresh: () => void } {
  let sort = o.sort;
  let shown: R[] = [];
  let active = -1;
  const text = (c: Column<R>, r: R) => (c.text ? c.text(r) : String(c.value(r) ?? "–"));
  const numeric = o.columns.map((c) => o.rows.some((r) => typeof c.value(r) === "number"));
  const search = (r: R) => `${o.name(r)} ${o.columns.map((c) => text(c, r)).join(" ")}`;

  const filter = h("input", {
    type: "search",
    id: `${o.id}-filter`,
    value: o.filter,
    placeholder: "filter: words in the name or any cell (e.g. layers.3 q_proj)",
    "aria-label": `filter ${o.label}`,
    "aria-controls": o.id,
  });
  const status = h("span", { class: "muted", role: "status", id: `${o.id}-count` });
  const heads = o.columns.map((c, i) =>
    h(
      "th",
      { scope: "col", "data-key": c.key, title: c.title, class: numeric[i] ? "num" : undefined },
      h("button", { type: "button", onclick: () => sortBy(c.key) }, c.label),
    ),
  );
  const body = h("tbody", {});
  const table = h(
    "table",
    { class: "data-table", id: o.id, "data-csv": "" },
    h("thead", {}, h("tr", {}, ...heads)),
    body,
  );
  const scroller = h(
    "div",
    {
      class: "table-scroll",
      tabindex: 0,
      role: "grid",
      "aria-label": `${o.label}: arrow keys move, Enter opens`,
    },
    table,
  );
  const csv = csvButton(o.label, () => [
    o.columns.map((c) => c.label),
    ...shown.map((r) => o.columns.map((c): Cell => c.value(r))),
  ]);
  csv.id = `${o.id}-csv`;

  function sortBy(key: string): void {
    const first = o.rows.length ? o.columns.find((c) => c.key === key)!.value(o.rows[0]) : null;
    sort = sort === key ? `-${key}` : sort === `-${key}` ? key : typeof first === "string" ? key : `-${key}`;
    update();
    o.onState(sort, filter.value);
  }

  function update(): void {
    shown = sortRows(filterRows(o.rows, filter.value, search), sort, o.columns);
    active = Math.min(active, shown.length - 1);
    status.textContent = `${shown.length} of ${o.rows.length} matrices`;
    for (const th of heads) {
      const key = th.dataset.key;
      th.setAttribute("aria-sort", sort === key ? "ascending" : sort === `-${key}` ? "descending" : "none");
    }
    draw();
  }

  /** The rows in view (and a few around), between spacers standing for the rest. */
  function draw(): void {
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_HEIGHT) - OVERSCAN);
    const count = Math.ceil((scroller.clientHeight || 600) / ROW_HEIGHT) + 2 * OVERSCAN;
    const last = Math.min(shown.length, first + count);
    const spacer = (rows: number) => {
      const tr = h("tr", { class: "spacer", "aria-hidden": "true" }, h("td", { colspan: o.columns.length }));
      tr.style.height = `${rows * ROW_HEIGHT}px`;
      tr.hidden = rows === 0;
      return tr;
    };
    const trs = shown.slice(first, last).map((r, k) => {
      const i = first + k;
      const tr = h(
        "tr",
        { id: `${o.id}-row-${i}`, "data-index": i, "aria-selected": i === active ? "true" : "false" },
        ...o.columns.map((c, j) =>
          h(
            j === 0 ? "th" : "td",
            j === 0 ? { scope: "row", title: o.name(r) } : { class: numeric[j] ? "num" : undefined },
            j === 0 ? h("a", { href: o.href(r), "data-link": true, tabindex: -1 }, text(c, r)) : text(c, r),
          ),
        ),
      );
      return tr;
    });
    body.replaceChildren(spacer(first), ...trs, spacer(shown.length - last));
    if (active >= 0) scroller.setAttribute("aria-activedescendant", `${o.id}-row-${active}`);
    else scroller.removeAttribute("aria-activedescendant");
  }

  /** Make row i the active one and scroll it into view. */
  function activate(i: number): void {
    if (!shown.length) return;
    active = Math.max(0, Math.min(shown.length - 1, i));
    const header = table.tHead?.offsetHeight ?? 0;
    const top = active * ROW_HEIGHT + header;
    if (top - header < scroller.scrollTop) scroller.scrollTop = top - header;
    else if (top + ROW_HEIGHT > scroller.scrollTop + scroller.clientHeight)
      scroller.scrollTop = top + ROW_HEIGHT - scroller.clientHeight;
    draw();
  }

  const page = () => Math.max(1, Math.floor(scroller.clientHeight / ROW_HEIGHT) - 1);
  const MOVES: Record<string, () => number> = {
    ArrowDown: () => active + 1,
    ArrowUp: () => active - 1,
    PageDown: () => active + page(),
    PageUp: () => active - page(),
    Home: () => 0,
    End: () => shown.length - 1,
  };
  scroller.addEventListener("keydown", (e) => {
    if (e.key in MOVES) {
      e.preventDefault();
      activate(MOVES[e.key]());
    } else if (e.key === "Enter" && shown[active]) {
      e.preventDefault();
      o.open(shown[active]);
    }
  });
  scroller.addEventListener("scroll", () => requestAnimationFrame(draw), { passive: true });
  body.addEventListener("click", (e) => {
    const tr = (e.target as HTMLElement).closest("tr[data-index]") as HTMLElement | null;
    if (!tr || (e.target as HTMLElement).closest("a")) return; // a link navigates by itself
    o.open(shown[Number(tr.dataset.index)]);
  });
  filter.addEventListener("input", () => {
    update();
    o.onState(sort, filter.value);
  });
  filter.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowDown") return;
    e.preventDefault();
    scroller.focus();
    activate(0);
  });

  update();
  const el = h(
    "div",
    { class: "table-tools" },
    h("div", { class: "export-bar" }, filter, status, csv),
    scroller,
  );
  return { el, refresh: update };
}
