// Update-mask export from the dashboard: create the job, poll it until the worker has written the
// file, then download it. The API never computes a mask itself (POST /api/analyses/{id}/masks, then
// GET .../masks/{mid} until done, then GET .../masks/{mid}/file); the same τ, mode and format give
// the same job, so a second click downloads the cached file at once.
import { ApiError, get, post, type MaskIn, type MaskOut } from "./api";
import { h } from "./dom";
import { toast } from "./toast";

const POLL_MS = 500;
const GIVE_UP_MS = 30 * 60 * 1000;

/** The finished mask job (status "done", with `file`); throws ApiError when it fails or is refused. */
export async function exportMask(
  analysis: string,
  body: MaskIn,
  onProgress?: (job: MaskOut) => void,
): Promise<MaskOut> {
  let job = await post<MaskOut>(`/api/analyses/${analysis}/masks`, body);
  const deadline = Date.now() + GIVE_UP_MS;
  while (job.status === "queued" || job.status === "running") {
    if (Date.now() > deadline)
      throw new ApiError(408, "still_running", "the mask export is still running; try again later");
    onProgress?.(job);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    job = await get<MaskOut>(`/api/analyses/${analysis}/masks/${job.id}`);
  }
  if (job.status === "failed")
    throw new ApiError(409, job.error?.code ?? "failed", job.error?.message ?? "the mask export failed");
  return job;
}

/** A format picker and an "Export mask" button for the analysis at the current τ and mode. */
export function maskExport(analysis: string, tau: () => number, relative: () => boolean): HTMLElement {
  const format = h(
    "select",
    { id: "mask-format", "aria-label": "mask format" },
    h("option", { value: "bool" }, "bool (1 byte per weight)"),
    h("option", { value: "packed" }, "packed bits"),
  );
  const label = "Export mask";
  const button = h("button", { type: "button", id: "mask-export" }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const body: MaskIn = {
        tau: tau(),
        relative: relative(),
        format: format.value as MaskIn["format"],
      };
      const job = await exportMask(analysis, body, (j) => {
        button.textContent = `Exporting… ${Math.round(100 * j.progress)}%`;
      });
      const link = h("a", { href: job.file!, download: "" });
      document.body.append(link);
      link.click();
      link.remove();
      toast(`mask ready (${((job.size ?? 0) / 1e6).toFixed(1)} MB)`);
    } catch (e) {
      toast(`mask export failed: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });
  return h("span", { class: "mask-export" }, format, " ", button);
}
