// New analysis: upload checkpoints (files or a whole folder, chunked and resumable), register a
// server path or download a model from the Hugging Face hub, pick kind, checkpoints and their order
// (base first: drag, or the up/down buttons), τ and a title, submit, then follow progress.
import {
  get,
  post,
  type AnalysisIn,
  type AnalysisOut,
  type Checkpoint,
  type Created,
  type PathIn,
  type ServerConfig,
} from "../api";
import type { components } from "../api-schema";
import type { Context } from "../context";
import { h } from "../dom";
import { bytes } from "../format";
import { withState } from "../state";
import { defaultName, safetensorsProblem, uploadCheckpoint } from "../upload";
import { viewOf } from "./analysis";

const WEIGHTS = [".safetensors"];
const PICKLED = [".bin", ".pt", ".pth"]; // only when the server allows pickles (DELTALENS_ALLOW_PICKLE)
type DownloadOut = components["schemas"]["DownloadOut"];
type Kind = AnalysisIn["kind"];

/** What each position in the order is, by kind: the base first, then the target(s). */
const ROLES: Record<Kind, (i: number, n: number) => string> = {
  pair: (i) => (i === 0 ? "base" : i === 1 ? "target" : "extra (a pair takes two)"),
  series: (i, n) => (i === 0 ? "base" : i === n - 1 ? "final" : `checkpoint ${i}`),
  overlap: (i) => (i === 0 ? "base" : `run ${String.fromCharCode(64 + i)}`),
};

/** The list of chosen checkpoints in order: drag an item, or move it with its ↑ ↓ buttons. */
function orderList(
  chosen: string[],
  nameOf: (id: string) => string,
  roleOf: (i: number, n: number) => string,
  changed: () => void,
): HTMLElement {
  const move = (from: number, to: number, focus?: string) => {
    if (![from, to].every((k) => Number.isInteger(k) && k >= 0 && k < chosen.length) || from === to) return;
    chosen.splice(to, 0, ...chosen.splice(from, 1));
    changed();
    // keyboard users stay on the moved item: the same button, or the other one at the top or bottom
    const item = focus && document.querySelector(`#order [data-id="${chosen[to]}"]`);
    if (item)
      (
        item.querySelector<HTMLElement>(`[data-move="${focus}"]:not([disabled])`) ??
        item.querySelector<HTMLElement>("[data-move]:not([disabled])")
      )?.focus();
  };
  return h(
    "ol",
    { id: "order", class: "order", "aria-label": "checkpoints in order, base first" },
    ...chosen.map((id, i) => {
      const name = nameOf(id);
      const item = h(
        "li",
        { draggable: "true", "data-id": id, "data-role": roleOf(i, chosen.length) },
        h("span", { class: "role" }, roleOf(i, chosen.length)),
        h("span", { class: "name" }, name),
        h(
          "button",
          {
            type: "button",
            "data-move": "up",
            "aria-label": `move ${name} up`,
            disabled: i === 0,
            onclick: () => move(i, i - 1, "up"),
          },
          "↑",
        ),
        h(
          "button",
          {
            type: "button",
            "data-move": "down",
            "aria-label": `move ${name} down`,
            disabled: i === chosen.length - 1,
            onclick: () => move(i, i + 1, "down"),
          },
          "↓",
        ),
        h(
          "button",
          {
            type: "button",
            "aria-label": `remove ${name}`,
            onclick: () => {
              chosen.splice(i, 1);
              changed();
            },
          },
          "×",
        ),
      );
      item.addEventListener("dragstart", (e) => e.dataTransfer?.setData("text/plain", String(i)));
      item.addEventListener("dragover", (e) => e.preventDefault());
      item.addEventListener("drop", (e) => {
        e.preventDefault();
        move(Number(e.dataTransfer?.getData("text/plain")), i);
      });
      return item;
    }),
  );
}

export async function renderNew(ctx: Context): Promise<void> {
  const { root, state } = ctx;
  const config = get<ServerConfig>("/api/config");
  let checkpoints = await get<Checkpoint[]>("/api/checkpoints");
  const { allow_pickle } = await config;
  if (!ctx.alive()) return;
  const suffixes = allow_pickle ? [...WEIGHTS, ...PICKLED] : WEIGHTS;
  const accepted = (f: File) => [...suffixes, ".json"].some((s) => f.name.endsWith(s));
  const chosen: string[] = [];
  const message = h("div", { role: "status", id: "new-message" });
  const list = h("div", { class: "chips", role: "group", "aria-label": "checkpoints to analyse" });
  const order = h("div");
  const nameOf = (id: string) => checkpoints.find((c) => c.id === id)?.name ?? id;
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
    order.replaceChildren(
      chosen.length
        ? orderList(chosen, nameOf, ROLES[kind.value as Kind], drawList)
        : h("p", { class: "muted" }, "Choose checkpoints above: the first is the base; reorder them below."),
    );
  };

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
    placeholder: "name (default: from the files)",
    size: 26,
    "aria-label": "checkpoint name",
    id: "upload-name",
    maxlength: 200,
  });
  let typed = false; // a name typed by hand is kept; otherwise each pick fills in its default
  nameInput.addEventListener("input", () => (typed = nameInput.value !== ""));
  let pending: File[] = []; // picked, not uploaded: waits for a free name
  const refuse = (text: string) => message.replaceChildren(h("div", { class: "error", role: "alert" }, text));
  const uploadButton = h(
    "button",
    { type: "button", id: "upload-start", hidden: true, onclick: () => start(pending) },
    "Upload",
  );
  /** Why these files cannot be uploaded under this name (checked here; the server checks again). */
  const problem = async (files: File[], name: string): Promise<string | null> => {
    if (!name) return "Give the checkpoint a name.";
    if (checkpoints.some((c) => c.name.toLowerCase() === name.toLowerCase()))
      return `A checkpoint named “${name}” exists already: choose another name, then press Upload.`;
    for (const f of files.filter((f) => f.name.endsWith(".safetensors"))) {
      const why = await safetensorsProblem(f);
      if (why) return why;
    }
    return null;
  };
  const start = async (picked: File[]) => {
    const wanted = picked.filter(accepted);
    if (!wanted.length) {
      refuse(`No ${[...suffixes, ".json"].join(", ")} files among those.`);
      return;
    }
    if (!typed) nameInput.value = defaultName(wanted);
    const name = nameInput.value.trim();
    pending = wanted;
    const why = await problem(wanted, name);
    uploadButton.hidden = why === null;
    if (why) return refuse(why);
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
      pending = [];
      typed = false;
      nameInput.value = "";
      message.replaceChildren(h("span", { class: "status done" }, `Uploaded and validated: ${name}`));
    } catch (e) {
      uploadButton.hidden = false; // try again, e.g. under another name
      refuse(`Upload refused: ${(e as Error).message}`);
    }
  };
  for (const input of [picker, folderPicker])
    input.addEventListener("change", () => {
      const picked = [...(input.files ?? [])];
      input.value = ""; // picking the same files again is a change too
      start(picked);
    });
  const drop = h(
    "div",
    { class: "dropzone", tabindex: 0 },
    `Drop a checkpoint folder or its files here (${suffixes.join(", ")}, index, config.json)`,
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
  kind.addEventListener("change", drawList);
  drawList();
  const titleInput = h("input", {
    type: "text",
    id: "analysis-title",
    "aria-label": "analysis title",
    placeholder: "title (default: target vs base)",
    maxlength: 200,
    size: 30,
  });
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
            kind: kind.value as Kind,
            checkpoints: chosen,
            taus: values,
            title: titleInput.value.trim() || undefined,
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
          uploadButton,
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
        h("div", { class: "controls" }, h("label", {}, "title ", titleInput)),
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
