// Thin client for the deltalens HTTP API; errors carry the API's {code, message}.

export class ApiError extends Error {
  constructor(public status: number, public code: string, message: string) {
    super(message);
  }
}

async function request<T>(method: string, path: string, body?: unknown, raw?: BodyInit): Promise<T> {
  const headers: Record<string, string> = {};
  const token = localStorage.getItem("deltalens-token");
  if (token && method !== "GET") headers["Authorization"] = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: raw ?? (body === undefined ? undefined : JSON.stringify(body)) });
  if (!response.ok) {
    let code = "http_error", message = `${response.status} ${response.statusText}`;
    try {
      const e = await response.json();
      code = e.code ?? code;
      message = e.message ?? message;
    } catch { /* not JSON */ }
    throw new ApiError(response.status, code, message);
  }
  return response.status === 204 ? (undefined as T) : ((await response.json()) as T);
}

export const get = <T>(path: string) => request<T>("GET", path);
export const post = <T>(path: string, body?: unknown) => request<T>("POST", path, body ?? {});
export const put = <T>(path: string, data: Blob) => request<T>("PUT", path, undefined, data);
export const del = (path: string) => request<void>("DELETE", path);

export interface AnalysisStatus {
  id: string; kind: "pair" | "series" | "overlap"; status: "queued" | "running" | "done" | "failed" | "cancelled";
  progress: number; error: { code: string; message: string } | null; checkpoints: string[]; taus: number[];
  created_at: string; detail: { eta_s?: number | null; tensors_done?: number; tensors_total?: number; tensor?: string } | null;
}
export interface Checkpoint { id: string; name: string; source: string; path: string; bytes: number; created_at: string }
export interface Heatmap {
  metric: string; mode: string; tau: number; layers: (number | null)[]; matrices: string[];
  values: (number | null)[][]; changed: (number | null)[][]; numel: (number | null)[][];
}
export interface HeatmapCube { layers: (number | null)[]; matrices: string[]; numel: (number | null)[][]; hist: (number[] | null)[][]; bin_edges: number[] }
export interface Curve { tau: number[]; sparsity: number[] }
export interface TensorDetail {
  name: string; layer: number | null; block: string; matrix: string; shape: number[]; numel: number;
  rank: number | null; full_rank: number | null; rank_pct: number | null; effective_rank: number | null;
  stable_rank: number | null; rank90: number | null; rank99: number | null; norm_delta: number; norm_base: number;
  histograms: { abs?: number[]; rel?: number[] }; bin_edges: number[];
  spectrum: { idx: number[]; sigma: number[] } | null;
  update_map: { tau: number; grid_rows: number; grid_cols: number; cells: number[]; row_frac: number[]; col_frac: number[]; head_frac: number[] | null } | null;
}
