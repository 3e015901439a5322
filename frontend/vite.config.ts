import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { brotliCompressSync, constants, gzipSync } from "node:zlib";
import { defineConfig, type Plugin } from "vite";

/** Content coding suffix -> compressor. Brotli quality 9: 1.3 s for the Plotly chunk; 11 would save another
 * 9 % for 10x the build time. */
const CODECS: Record<string, (raw: Buffer) => Buffer> = {
  ".br": (raw) =>
    brotliCompressSync(raw, {
      params: { [constants.BROTLI_PARAM_QUALITY]: 9, [constants.BROTLI_PARAM_SIZE_HINT]: raw.length },
    }),
  ".gz": (raw) => gzipSync(raw, { level: 9 }),
};

/** A .br and a .gz copy beside every built asset that compresses: the API sends the one the browser
 * accepts with its Content-Encoding (backend/static.py), with no compression work per request. */
function precompress(): Plugin {
  return {
    name: "deltalens-precompress",
    apply: "build",
    writeBundle(options, bundle) {
      for (const file of Object.values(bundle)) {
        if (!file.fileName.startsWith("assets/")) continue; // index.html is small and served from memory
        const raw = Buffer.from(file.type === "chunk" ? file.code : file.source);
        for (const [suffix, pack] of Object.entries(CODECS)) {
          const packed = pack(raw);
          if (packed.length < raw.length) writeFileSync(join(options.dir!, file.fileName + suffix), packed);
        }
      }
    },
  };
}

/** Modules plotly.js' sources import for trace types src/plotly.ts leaves out, resolved to nothing:
 * the registry requires maplibre's stylesheet (map traces) whatever is registered. */
const UNUSED = new Set(["maplibre-gl/dist/maplibre-gl.css"]);
function stubUnused(): Plugin {
  return {
    name: "deltalens-stub-unused",
    enforce: "pre",
    resolveId: (id) => (UNUSED.has(id) ? "\0unused" : null),
    load: (id) => (id === "\0unused" ? "export {};" : null),
  };
}

export default defineConfig({
  plugins: [stubUnused(), precompress()],
  define: { global: "globalThis" }, // plotly.js' sources (src/plotly.ts) were written for browserify
  // the API serves the build from inside the Python package (deltalens/backend/dashboard)
  build: { outDir: "../backend/dashboard", emptyOutDir: true, chunkSizeWarningLimit: 1600 },
  server: { proxy: { "/api": "http://127.0.0.1:8000", "/s": "http://127.0.0.1:8000" } },
});
