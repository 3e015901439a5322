import { defineConfig } from "vite";

export default defineConfig({
  // the API serves the build from inside the Python package (deltalens/backend/dashboard)
  build: { outDir: "../backend/dashboard", emptyOutDir: true, chunkSizeWarningLimit: 6000 },
  server: { proxy: { "/api": "http://127.0.0.1:8000", "/s": "http://127.0.0.1:8000" } },
});
