// Runs an explainer on ONNX Runtime Web (WASM) in headless Chromium: node run_ort_web.mjs REQUEST.json
// The request and result are those of run_ort_node.mjs, plus request.threads (WASM threads) and
// request.externalData (file names beside the model). A local server gives the page the model,
// the inputs and onnxruntime-web, with the cross-origin isolation headers that WASM threads need.
import { createRequire } from "node:module";
import { createServer } from "node:http";
import { readFileSync, writeFileSync } from "node:fs";
import { basename, dirname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(process.env.LRP_ONNX_NODE_ROOT, "noop.js"));
const { chromium } = require("playwright-core");
const ortDist = join(process.env.LRP_ONNX_NODE_ROOT, "node_modules", "onnxruntime-web", "dist");
const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const modelFolder = dirname(request.model);

const PAGE = `<!doctype html><script type="module">
import * as ort from "/ort/ort.wasm.min.mjs";
import { tensorFromBytes, tensorBytes, timedRuns } from "/js/tensors.mjs";
ort.env.wasm.wasmPaths = "/ort/";
window.runExplainer = async (request) => {
  ort.env.wasm.numThreads = crossOriginIsolated ? request.threads : 1;
  const fetched = async (url) => new Uint8Array(await (await fetch(url)).arrayBuffer());
  const externalData = request.externalData.map((name) => ({ path: name, data: "/model/" + name }));
  const session = await ort.InferenceSession.create("/model/" + request.modelName, { executionProviders: ["wasm"], externalData });
  const feeds = {};
  for (const spec of request.inputs) feeds[spec.name] = tensorFromBytes(ort, spec, await fetched("/inputs/" + spec.fileName));
  const { outputs, seconds } = await timedRuns(session, feeds, request.repeats);
  const base64 = (bytes) => { let s = ""; for (let i = 0; i < bytes.length; i += 32768) s += String.fromCharCode(...bytes.subarray(i, i + 32768)); return btoa(s); };
  return { seconds, outputs: Object.entries(outputs).map(([name, t]) => ({ name, dtype: t.type, shape: t.dims, data: base64(tensorBytes(t)) })) };
};
window.pageReady = true;
</script>`;

// URL prefix -> folder; anything else is the page.
const ROOTS = { "/ort/": ortDist, "/js/": here, "/model/": modelFolder, "/inputs/": request.folder };
const TYPES = { ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm" };

function serve(req, res) {
  const path = decodeURIComponent(new URL(req.url, "http://localhost").pathname);
  const headers = { "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp" };
  const prefix = Object.keys(ROOTS).find((p) => path.startsWith(p));
  if (!prefix) { res.writeHead(200, { ...headers, "Content-Type": "text/html" }); res.end(PAGE); return; }
  const file = normalize(join(ROOTS[prefix], path.slice(prefix.length)));
  if (!file.startsWith(ROOTS[prefix])) { res.writeHead(403); res.end(); return; }
  try {
    const body = readFileSync(file);
    res.writeHead(200, { ...headers, "Content-Type": TYPES[file.slice(file.lastIndexOf("."))] || "application/octet-stream" });
    res.end(body);
  } catch { res.writeHead(404); res.end(); }
}

const server = createServer(serve);
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
// Closed networks refuse Chromium's background connections; these flags keep it from trying.
// Playwright gives the browser a fresh profile of its own.
const browser = await chromium.launch({
  executablePath: process.env.LRP_ONNX_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction(() => window.pageReady === true, null, { timeout: 60000 }).catch(() => {
    throw new Error(`the page did not load onnxruntime-web: ${errors.join("; ") || "no error reported"}`);
  });
  const pageRequest = { ...request, modelName: basename(request.model),
                        inputs: request.inputs.map((s) => ({ ...s, fileName: basename(s.file) })) };
  const result = await page.evaluate((r) => window.runExplainer(r), pageRequest);
  const outputs = result.outputs.map(({ name, dtype, shape, data }, k) => {
    const file = join(request.folder, `${k}.bin`);
    writeFileSync(file, Buffer.from(data, "base64"));
    return { name, dtype, shape, file };
  });
  console.log(JSON.stringify({ outputs, seconds: result.seconds }));
} finally {
  await browser.close();
  server.close();
}
