// Number formatting for cards and tables; "–" stands for a missing value.

export const pct = (x: number | null | undefined, digits = 2) =>
  x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`;
/** One formatter for every count that is not a whole number: `n.toLocaleString("en-US")` builds one per
 * call (slow on a heatmap's hover texts), same output. Made on first use: a page's first costs ~20 ms. */
let en: Intl.NumberFormat | undefined;
/** A count with thousands separators: 1,234,567 (whole numbers without Intl, as it writes them). */
export const count = (n: number) =>
  Number.isSafeInteger(n)
    ? String(n).replace(/\B(?=(\d{3})+$)/g, ",")
    : (en ??= new Intl.NumberFormat("en-US")).format(n);
export const int = (x: number | null | undefined) =>
  x === null || x === undefined ? "–" : count(Math.round(x));
export const sci = (x: number) => (x === 0 ? "0" : x.toExponential(2));
/** A τ as the number it is: the shortest text that reads back as the same double (1e-5,
 * 1.0013580322265625e-5), never a rounding that names a different threshold. */
export const tauText = (x: number) => (x === 0 ? "0" : x.toExponential());
export const bytes = (n: number) => {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};
