// What every view gets from the shell: its state (from the URL), where to draw, how to move on.
import type { ViewState } from "./state";

export interface Context {
  state: ViewState;
  root: HTMLElement;
  navigate: (state: ViewState, replace?: boolean) => void;
  remember: (state: ViewState) => void; // put the state in the URL without redrawing (slider moves)
  alive: () => boolean; // false once the user has moved to another view
}

/** A view draws itself into ctx.root; a rejected promise is shown as the view's error. */
export type Renderer = (ctx: Context) => Promise<void>;
