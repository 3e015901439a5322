// Matrix names → short labels and neighbours (pure: unit-tested in test/names.test.ts).

interface Named {
  name: string;
  layer: number | null;
}

/** The name's parts without a trailing ".weight" (a fused part keeps its "[q]"; ".bias" stays). */
const parts = (name: string) => name.replace(/\.weight(\[\w+\])?$/, (_, part) => part ?? "").split(".");

/** A tail that names nothing by itself: one starting with an index ("3.w1") or only "bias". */
const bare = (tail: string[]) => /^\d+$/.test(tail[0]) || tail.join(".") === "bias";

/** The shortest dotted tail of each name that no other name in the list ends with and that names a
 * matrix: "q_proj", "q_proj.bias", "experts.3.w1", "input_layernorm". */
export function uniqueLabels(names: string[]): string[] {
  const split = names.map(parts);
  return split.map((p, i) => {
    for (let k = 1; k < p.length; k++) {
      const tail = p.slice(-k).join(".");
      if (!bare(p.slice(-k)) && split.every((q, j) => j === i || q.slice(-k).join(".") !== tail)) return tail;
    }
    return p.join(".");
  });
}

/** The name with its layer index replaced: the same matrix in every layer has the same key. */
const layerKey = (r: Named) =>
  r.layer === null ? null : r.name.replace(new RegExp(`([._])${r.layer}([._])`), "$1#$2");

/** The same matrix one layer up and down (the nearest layers that have it); none for a matrix outside
 * the layers (embeddings, final norm, `other`). */
export function layerNeighbours<R extends Named>(
  all: R[],
  t: Named,
): { prev?: R; next?: R; inLayers: boolean } {
  const key = layerKey(t);
  if (key === null || key === t.name) return { inLayers: false };
  const same = all.filter((r) => r.layer !== null && layerKey(r) === key);
  const below = same.filter((r) => r.layer! < t.layer!).sort((a, b) => b.layer! - a.layer!);
  const above = same.filter((r) => r.layer! > t.layer!).sort((a, b) => a.layer! - b.layer!);
  return { prev: below[0], next: above[0], inLayers: true };
}
