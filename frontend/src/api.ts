// Thin client for the deltalens HTTP API; errors carry the API's {code, message}.
//
// Response types come from the backend's OpenAPI document (src/api-schema.ts, generated: regenerate
// with `npm run api-types:sync`). The interfaces below the generated ones are hand-written for the
// endpoints whose schema is still an untyped object; replace each with its schema type once the
// backend declares a response model for it.
import type { components } from "./api-schema";

type Schemas = components["schemas"];

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

async function request<T>(method: string, path: string, body?: unknown, raw?: BodyInit): Promise<T> {
  const headers: Record<string, string> = {};
  const token = localStorage.getItem("deltalens-token");
  if (token && method !== "GET") headers["Authorization"] = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: raw ?? (body === undefined ? undefined : JSON.stringify(body)),
  });
  if (!response.ok) {
    let code = "http_error",
      message = `${response.status} ${response.statusText}`;
    try {
      const e: Partial<ErrorOut> = await response.json();
      code = e.code ?? code;
      message = e.message ?? message;
    } catch {
      /* not JSON */
    }
    throw new ApiError(response.status, code, message);
  }
  return response.status === 204 ? (undefined as T) : ((await response.json()) as T);
}

/** GETs started before the code that reads them has loaded (main.ts: an analysis' status, and the
 * overview's data, while its view's chunk loads): the next get() of a path takes it; the next getAhead()
 * drops any not taken. A GET started early that failed is made again. */
const ahead = new Map<string, Promise<unknown>>();
export function getAhead(paths: string[]): void {
  ahead.clear();
  for (const path of paths) {
    const response = request("GET", path);
    response.catch(() => undefined); // its reader sees the error
    ahead.set(path, response);
  }
}

export function get<T>(path: string): Promise<T> {
  const early = ahead.get(path) as Promise<T> | undefined;
  ahead.delete(path);
  // asked for before its view knew the analysis was done: a refusal then (409 not_ready) is asked again
  return early ? early.catch(() => request<T>("GET", path)) : request<T>("GET", path);
}
export const post = <T>(path: string, body?: unknown) => request<T>("POST", path, body ?? {});
export const put = <T>(path: string, data: Blob) => request<T>("PUT", path, undefined, data);
export const patch = <T>(path: string, body: unknown) => request<T>("PATCH", path, body);
export const del = (path: string) => request<void>("DELETE", path);

// --- from the backend's schema -----------------------------------------------------------------------
export type AnalysisOut = Schemas["AnalysisOut"];
export type AnalysisIn = Schemas["AnalysisIn"];
export type AnalysisRename = Schemas["AnalysisRename"];
export type Headline = Schemas["Headline"];
export type ServerConfig = Schemas["ServerConfig"];
type ErrorOut = Schemas["ErrorOut"];
export type Created = Schemas["Created"];
export type UploadIn = Schemas["UploadIn"];
export type UploadOut = Schemas["UploadOut"];
export type ChunkOut = Schemas["ChunkOut"];
export type PathIn = Schemas["PathIn"];
export type LinkIn = Schemas["LinkIn"];
export type LinkOut = Schemas["LinkOut"];
export type Checkpoint = Schemas["CheckpointOut"];
export type Heatmap = Schemas["Heatmap"];
export type HeatmapCube = Schemas["HeatmapCube"];
export type SparsityCurve = Schemas["SparsityCurve"];
export type Curve = Pick<SparsityCurve, "tau" | "sparsity">;
export type PairSummary = Schemas["PairSummary"]; // /summary of a pair analysis
export type TensorRow = Schemas["TensorRow"];
export type TensorDetail = Schemas["TensorDetail"];
export type TensorChanged = Schemas["TensorChanged"];
export type GeometryView = Schemas["GeometryView"];
export type Series = Schemas["SeriesView"];
export type SeriesResult = Schemas["SeriesResult"]; // /result of a series analysis
export type Overlap = Schemas["OverlapView"];
export type Comparison = Schemas["Comparison"];
export type MaskIn = Schemas["MaskIn"];
export type MaskOut = Schemas["MaskOut"];

// --- hand-written: the schema leaves these open ------------------------------------------------------
/** AnalysisOut.detail: the worker's latest progress report (an untyped object in the schema). */
interface ProgressDetail {
  eta_s?: number | null;
  tensors_done?: number;
  tensors_total?: number;
  tensor?: string;
}
export const progressOf = (a: AnalysisOut) => a.detail as ProgressDetail | null;
