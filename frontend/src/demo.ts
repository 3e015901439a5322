// The demo banner: while `deltalens up --demo` trains the demo models, every page shows the stage,
// a progress bar and the ETA (GET /api/demo), and drops the banner once training is done.
import { get } from "./api";
import type { components } from "./api-schema";
import { h } from "./dom";

type DemoStatus = components["schemas"]["DemoStatus"];

const POLL_MS = 2000;
const ACTIVE = new Set<DemoStatus["state"]>(["starting", "training"]);

/** "45 s", "3 min": an estimate, so whole units. */
const eta = (s: number) => (s < 90 ? `${Math.max(1, Math.round(s))} s` : `${Math.round(s / 60)} min`);

/** Done share of all stages (each stage counts the same). */
const overall = ({ index = 0, total = 0, step = 0, steps = 0 }: DemoStatus) =>
  total ? (Math.max(0, index - 1) + (steps ? step / steps : 0)) / total : 0;

function banner(d: DemoStatus): HTMLElement {
  if (d.state === "failed")
    return h(
      "div",
      { id: "demo-banner", class: "demo-banner failed", role: "status" },
      "Demo training stopped: the analyses of the stages it finished are shown.",
    );
  const stage = d.stage ? `${d.stage} (${d.index}/${d.total})` : "starting";
  return h(
    "div",
    { id: "demo-banner", class: "demo-banner", role: "status" },
    h("strong", {}, "Training the demo models: "),
    stage,
    d.steps ? ` · step ${d.step}/${d.steps}` : null,
    d.figure ? ` · ${d.figure}` : null,
    h("progress", { max: 1, value: overall(d), "aria-label": "demo training progress" }),
    h("span", { class: "muted" }, d.eta_s ? `about ${eta(d.eta_s)} left` : "estimating time left"),
    h("span", { class: "muted" }, " · analyses appear as their checkpoints land"),
  );
}

/** Poll the demo's status and keep the banner (under the header) in step; stops once nothing trains. */
export async function watchDemo(): Promise<void> {
  let d: DemoStatus;
  try {
    d = await get<DemoStatus>("/api/demo");
  } catch {
    setTimeout(watchDemo, POLL_MS * 5); // the API restarting: try again later
    return;
  }
  const active = ACTIVE.has(d.state);
  const next = active || d.state === "failed" ? banner(d) : null;
  const old = document.getElementById("demo-banner");
  if (next && old) old.replaceWith(next);
  else if (next) document.querySelector("header.top")!.after(next);
  else old?.remove();
  if (active) setTimeout(watchDemo, POLL_MS);
}
