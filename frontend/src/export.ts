// Export: CSV of tables and heatmaps, downloaded from the page (no request: the data is already here).
import { h } from "./dom";

export type Cell = string | number | null | undefined;

/** Text that reads as a number (a table cell's "-1.2", "3.4%", "1,234", "-2e-5"): kept as it is. */
const NUMERIC = /^[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?%?$/i;

/** A CSV field (RFC 4180). Text that a spreadsheet would run as a formula (=, +, -, @ first) gets a
 * leading ' : names are data, never formulas. Numbers, and text that is a number, are written as
 * they are. */
function field(v: Cell): string {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isFinite(v) ? String(v) : "";
  const text = !NUMERIC.test(v.trim()) && /^[=+\-@\t\r]/.test(v) ? `'${v}` : v;
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

export const toCsv = (rows: Cell[][]): string =>
  rows.map((r) => r.map(field).join(",")).join("\r\n") + "\r\n";

/** Plotly text (charts.plotlyText: &, <, > escaped) back to the name it shows. */
export const fromPlotlyText = (s: string): string =>
  s.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");

/** A heatmap trace as a grid: a corner cell, the column labels, then one row per y label. Values are the
 * trace's customdata when it has them (the colour bar's unit, before any log), else z; labels are
 * meta.csv's when given (cell edges on the axes), else the axes' own. */
export function heatmapCsv(trace: any, corner = ""): Cell[][] {
  const values: Cell[][] = trace.customdata ?? trace.z;
  const label = (v: unknown) => (typeof v === "string" ? fromPlotlyText(v) : (v as Cell));
  const cols: Cell[] = trace.meta?.csv?.cols ?? (trace.x ?? values[0].map((_, j) => j)).map(label);
  const rows: Cell[] = trace.meta?.csv?.rows ?? (trace.y ?? values.map((_, i) => i)).map(label);
  return [[corner, ...cols], ...values.map((row, i) => [rows[i], ...row])];
}

/** An HTML table as rows of its cells' text (header rows included). */
export const tableRows = (table: HTMLTableElement): Cell[][] =>
  [...table.querySelectorAll("tr")].map((tr) =>
    [...tr.querySelectorAll("th, td")].map((c) => (c as HTMLElement).innerText.trim()),
  );

/** Save text as a file through the browser's download. */
export function download(filename: string, text: string, type = "text/csv"): void {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** A file name from a title: letters, digits and dashes. */
export const fileName = (title: string, ext: string) =>
  `${
    title
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, "-")
      .replace(/^-|-$/g, "")
      .slice(0, 60) || "deltalens"
  }.${ext}`;

/** A "CSV" button that downloads `rows()` as `name`.csv when clicked. */
export const csvButton = (name: string, rows: () => Cell[][], id?: string) =>
  h(
    "button",
    {
      type: "button",
      class: "csv",
      id,
      title: `Download ${name} as CSV`,
      onclick: () => download(fileName(name, "csv"), toCsv(rows())),
    },
    "CSV",
  );

/** A CSV button before every table under `root` that has none yet (its text as shown). */
export function csvForTables(root: HTMLElement): void {
  for (const table of root.querySelectorAll<HTMLTableElement>("table:not([data-csv])")) {
    table.dataset.csv = "";
    const title = table.closest("section")?.querySelector("h2, h3")?.textContent ?? table.id ?? "table";
    table.before(
      h(
        "div",
        { class: "export-bar" },
        csvButton(title, () => tableRows(table)),
      ),
    );
  }
}
