// New analysis: upload checkpoints (files or a whole folder, chunked and resumable), register a
// server path or download a model from the Hugging Face hub, pick kind, checkpoints in order and τ,
// submit, then follow progress.
import {
  get,
  post,
  type AnalysisIn,
  type AnalysisOut,
  type Checkpoint,
  type Created,
  type PathIn,
} from "../api";
import type { components } from "../api-schema";
import type { Context } from "../context";
import { h } from "../dom";
import { bytes } from "../format";
import { withState } from "../state";
import { uploadCheckpoint } from "../upload";
import { viewOf } from "./analysis";

const WANTED = /(\.safetensors|\.json)$/;
type DownloadOut = components["schemas"]["DownloadOut"];

export async function renderNew(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  let checkpoints = await get<Checkpoint[]>("/api/checkpoints");
  if (!ctx.alive()) return;
  const chosen: string[] = [];
  const message = h("div", { role: "status" });
  const list = h("div", { class: "chips", role: "group", "aria-label": "checkpoints, base first" });
  const order = h("p", { class: "muted" });
  const drawList = () => {
    list.replaceChildren(
      ...checkpoints.map((c) =>
        h(
          "button",
          {
            type: "button",
            "aria-pressed": String(chosen.includes(c.id)),
            "data-checkpoint": c.id,
            title: c.path,
            onclick: () => {
              const i = chosen.indexOf(c.id);
              if (i >= 0) chosen.splice(i, 1);
              else chosen.push(c.id);
              drawList();
            },
          },
          `${c.name} · ${bytes(c.bytes)}`,
        ),
      ),
    );
    order.textContent = chosen.length
      ? `Order: ${chosen.map((id, i) => `${i === 0 ? "base" : i}: ${checkpoints.find((c) => c.id === id)?.name}`).join(" → ")}`
      : "Click checkpoints in order: the base first, then the fine-tuned one(s).";
  };
  drawList();

  // uploads
  const files = h("ul", { class: "files" });
  const picker = h("input", {
    type: "file",
    multiple: true,
    "aria-label": "checkpoint files",
    id: "file-input",
  });
  const folderPicker = h("input", { type: "file", webkitdirectory: true, "aria-label": "checkpoint folder" });
  const nameInput = h("input", {
    type: "text",
    placeholder: "name (e.g. llama-sft)",
    "aria-label": "checkpoint name",
    id: "upload-name",
  });
  const start = async (picked: File[]) => {
    const wanted = picked.filter((f) => WANTED.test(f.name));
    if (!wanted.length) {
      message.replaceChildren(h("div", { class: "error" }, "No .safetensors or .json files among those."));
      return;
    }
    const folder = wanted[0].webkitRelativePath.split("/")[0];
    const name =
      nameInput.value ||
      folder ||
      wanted.find((f) => f.name.endsWith(".safetensors"))!.name.replace(/\.safetensors$/, "");
    const bars = new Map(
      wanted.map((f) => [
        f.name,
        h("progress", { max: f.size || 1, value: 0, "aria-label": `upload of ${f.name}` }),
      ]),
    );
    files.replaceChildren(
      ...wanted.map((f) => h("li", {}, bars.get(f.name)!, ` ${f.name} (${bytes(f.size)})`)),
    );
    message.replaceChildren(`Uploading ${name}…`);
    try {
      const id = await uploadCheckpoint(name, wanted, (file, done) => {
        bars.get(file)!.value = done;
      });
      checkpoints = await get<Checkpoint[]>("/api/checkpoints");
      chosen.push(id);
      drawList();
      message.replaceChildren(h("span", { class: "status done" }, `Uploaded and validated: ${name}`));
    } catch (e) {
      message.replaceChildren(
        h("div", { class: "error", role: "alert" }, `Upload refused: ${(e as Error).message}`),
      );
    }
  };
  picker.addEventListener("change", () => start([...(picker.files ?? [])]));
  folderPicker.addEventListener("change", () => start([...(folderPicker.files ?? [])]));
  const drop = h(
    "div",
    { class: "dropzone", tabindex: 0 },
    "Drop a checkpoint folder or its files here (.safetensors, index, config.json)",
  );
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    start([...(e.dataTransfer?.files ?? [])]);
  });

  const pathInput = h("input", {
    type: "text",
    placeholder: "/models/llama-3-8b-dpo",
    size: 40,
    "aria-label": "server path",
  });
  const register = h(
    "button",
    {
      type: "button",
      onclick: async () => {
        try {
          const body: PathIn = { path: pathInput.value };
          const { id } = await post<Created>("/api/checkpoints", body);
          checkpoints = await get<Checkpoint[]>("/api/checkpoints");
          chosen.push(id);
          drawList();
          message.replaceChildren(h("span", { class: "status done" }, "Registered."));
        } catch (e) {
          message.replaceChildren(h("div", { class: "error", role: "alert" }, (e as Error).message));
        }
      },
    },
    "Register path",
  );

  // a model on the Hugging Face hub: the server downloads it, then it is used like a registered path
  const hubInput = h("input", {
    type: "text",
    placeholder: "org/name@revision",
    size: 40,
    "aria-label": "Hugging Face hub model",
    id: "hub-input",
  });
  const hubBar = h("progress", { max: 1, value: 0, "aria-label": "hub download", id: "hub-progress" });
  hubBar.hidden = true;
  const fetchHub = h(
    "button",
    {
      type: "button",
      id: "hub-fetch",
      onclick: async () => {
        try {
          const body: PathIn = { hub: hubInput.value.trim() };
          let d = await post<DownloadOut>("/api/checkpoints", body);
          hubBar.hidden = false;
          while (d.state === "queued" || d.state === "downloading") {
            hubBar.max = d.total_bytes || 1;
            hubBar.value = d.done_bytes;
            message.replaceChildren(
              `Downloading ${d.hub}@${d.revision}: ${d.files_done}/${d.files_total} files, ` +
                `${bytes(d.done_bytes)} of ${bytes(d.total_bytes)}…`,
            );
            await new Promise((r) => setTimeout(r, 500));
            if (!ctx.alive()) return;
            d = await get<DownloadOut>(`/api/downloads/${d.id}`);
          }
          hubBar.hidden = true;
          if (d.state === "failed" || !d.checkpoint) throw new Error(d.error?.message ?? "download failed");
          checkpoints = await get<Checkpoint[]>("/api/checkpoints");
          chosen.push(d.checkpoint);
          drawList();
          message.replaceChildren(
            h("span", { class: "status done" }, `Downloaded and registered: ${d.hub}@${d.revision}`),
          );
        } catch (e) {
          hubBar.hidden = true;
          message.replaceChildren(h("div", { class: "error", role: "alert" }, (e as Error).message));
        }
      },
    },
    "Download from hub",
  );

  // the analysis
  const kind = h(
    "select",
    { "aria-label": "kind", id: "kind" },
    h("option", { value: "pair" }, "pair: base → fine-tuned"),
    h("option", { value: "series" }, "series: base, checkpoints…, final"),
    h("option", { value: "overlap" }, "overlap: base + 2 or more runs"),
  );
  const taus = h("input", {
    type: "text",
    value: String(state.tau),
    "aria-label": "tau",
    id: "taus",
    size: 12,
  });
  const follow = h("div");
  const submit = h(
    "button",
    {
      type: "button",
      class: "primary",
      id: "submit",
      onclick: async () => {
        const values = taus.value
          .split(/[\s,]+/)
          .filter(Boolean)
          .map(Number);
        try {
          const body: AnalysisIn = {
            kind: kind.value as AnalysisIn["kind"],
            checkpoints: chosen,
            taus: values,
          };
          const { id } = await post<Created>("/api/analyses", body);
          const poll = async () => {
            const s = await get<AnalysisOut>(`/api/analyses/${id}`);
            if (!ctx.alive()) return;
            follow.replaceChildren(
              h(
                "p",
                {},
                `Analysis ${id}: `,
                h("span", { class: `status ${s.status}`, id: "follow-status" }, s.status),
                " ",
                h("progress", { max: 1, value: s.progress }),
                ` ${Math.round(100 * s.progress)}%`,
                s.error ? h("div", { class: "error" }, s.error.message) : null,
              ),
            );
            if (s.status === "done") ctx.navigate(withState(state, { view: viewOf(s.kind), analysis: id }));
            else if (s.status === "queued" || s.status === "running") setTimeout(poll, 500);
          };
          await poll();
        } catch (e) {
          follow.replaceChildren(h("div", { class: "error", role: "alert" }, (e as Error).message));
        }
      },
    },
    "Start analysis",
  );

  root.replaceChildren(
    h("h1", {}, "New analysis"),
    h(
      "div",
      { class: "grid2" },
      h(
        "section",
        { class: "panel" },
        h("h2", {}, "1 · Checkpoints"),
        drop,
        h(
          "div",
          { class: "controls" },
          nameInput,
          h("label", {}, "files ", picker),
          h("label", {}, "folder ", folderPicker),
        ),
        files,
        h("div", { class: "controls" }, h("label", {}, "server path ", pathInput), register),
        h("div", { class: "controls" }, h("label", {}, "Hugging Face hub ", hubInput), fetchHub, hubBar),
        message,
      ),
      h(
        "section",
        { class: "panel" },
        h("h2", {}, "2 · Analysis"),
        h("div", { class: "controls" }, h("label", {}, "kind ", kind), h("label", {}, "τ ", taus)),
        h(
          "p",
          { class: "muted" },
          "A weight counts as changed when |Δ| > τ. Several τ may be given, separated by commas.",
        ),
        list,
        order,
        submit,
        follow,
      ),
    ),
  );
}
