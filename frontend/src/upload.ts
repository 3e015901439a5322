// The upload protocol: open a session listing the files, PUT each file in chunks at the offset the
// server holds, then complete the session into a checkpoint. A failed chunk is retried from the
// server's own count, so an interrupted upload resumes instead of starting over.
import { ApiError, get, post, put, type ChunkOut, type Created, type UploadIn, type UploadOut } from "./api";

const CHUNK = 8 << 20;
const RETRIES = 5;

/** Upload files as one checkpoint; returns the new checkpoint's id. */
export async function uploadCheckpoint(
  name: string,
  files: File[],
  onProgress: (file: string, done: number, total: number) => void,
): Promise<string> {
  const request: UploadIn = { name, files: files.map((f) => ({ name: f.name, size: f.size })) };
  const session = await post<UploadOut>("/api/uploads", request);
  for (const file of files) {
    let offset = 0;
    let failures = 0;
    onProgress(file.name, 0, file.size);
    while (offset < file.size) {
      try {
        const r = await put<ChunkOut>(
          `/api/uploads/${session.id}/files/${encodeURIComponent(file.name)}?offset=${offset}`,
          file.slice(offset, offset + CHUNK),
        );
        offset = r.received;
        failures = 0;
      } catch (e) {
        // retried: a gap (resume from the server's count), a chunk still being written, a dropped chunk
        const retry = ["offset_gap", "upload_busy", "upload_timeout"];
        if (e instanceof ApiError && e.status < 500 && !retry.includes(e.code)) throw e;
        if (++failures > RETRIES) throw e;
        await new Promise((r) => setTimeout(r, 500 * failures));
        const status = await get<UploadOut>(`/api/uploads/${session.id}`); // resume where the server is
        offset = status.files.find((f) => f.name === file.name)!.received;
      }
      onProgress(file.name, offset, file.size);
    }
  }
  return (await post<Created>(`/api/uploads/${session.id}/complete`)).id;
}

const MAX_HEADER = 100 << 20; // safetensors' own limit on the JSON header

/** Why a `.safetensors` file is not one, read from its first 8 + N bytes (a little-endian u64 N, then
 * N bytes of a UTF-8 JSON object), or null when the header reads; the server checks it all again. */
export async function safetensorsProblem(file: File): Promise<string | null> {
  const notOne = (why: string) => `${file.name}: not a safetensors file (${why})`;
  if (file.size < 8) return notOne("shorter than the 8 bytes that give its header's size");
  const size = new DataView(await file.slice(0, 8).arrayBuffer()).getBigUint64(0, true);
  if (size > BigInt(Math.min(MAX_HEADER, file.size - 8)))
    return notOne(`the first 8 bytes give a header of ${size} bytes, more than the file holds`);
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(
      await file.slice(8, 8 + Number(size)).arrayBuffer(),
    );
    const header: unknown = JSON.parse(text);
    if (header === null || typeof header !== "object" || Array.isArray(header)) throw new Error();
  } catch {
    return notOne("its header is not JSON");
  }
  return null;
}

/** The name a checkpoint gets unless one is typed: its folder's, else its first weight file's stem. */
export function defaultName(files: File[]): string {
  const folder = files[0]?.webkitRelativePath.split("/")[0];
  if (folder) return folder;
  const weights = files.find((f) => !f.name.endsWith(".json")) ?? files[0];
  return weights ? weights.name.replace(/\.[^.]+$/, "") : "";
}
