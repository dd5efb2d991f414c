// The digits demo: draw on #pad, explain the drawing with the explainer graph on ONNX Runtime Web
// (WASM), show the logits and the relevance heatmap. Served from the repository root, so that
// onnxruntime-web comes from the node_modules that `npm ci` installs there (see web/README.md).
//
// window.lrpDemo is the page's interface for tests: ready (a Promise), explain(input, target),
// settled() (resolves once the drawing on screen has been explained) and the last run's lastInput,
// lastTarget, lastLogits, lastRelevance (Float32Arrays, or null while the pad is blank).

const ORT_DIST = new URL("../node_modules/onnxruntime-web/dist/", import.meta.url).href;
const MODEL_URL = new URL("digits_cnn.lrp.onnx", import.meta.url).href;
const TARGET_INPUT = "target"; // lrp-onnx's extra input: the class to explain, -1 = the predicted one
const GRID = 8; // the model reads [N, 1, 8, 8] ink in [0, 1], like scikit-learn's digits / 16
const CLASSES = 10;

// scikit-learn's digits are 32×32 bitmaps counted in 4×4 blocks, the digit scaled to the full
// height (or width) and centred. The drawing is redrawn the same way, at a fixed pen width
// relative to the frame, so that neither the size drawn nor the pen matters.
const BLOCK = 8; // offscreen pixels per input cell: a finer raster than 4 for smoother ink
const FRAME = GRID * BLOCK;
const FRAME_PEN = 0.16; // pen width / frame: about 1.3 cells, the stroke width of the training digits
const PAD_PEN = 0.07; // pen width / pad on screen
const LIVE_INTERVAL_MS = 60; // while a stroke is drawn, explain at most this often

const pad = document.getElementById("pad");
const padContext = pad.getContext("2d");
const PAD_SIZE = pad.width; // stroke points are kept in these units, whatever the canvas's CSS size
const frame = document.createElement("canvas");
frame.width = frame.height = FRAME;
const frameContext = frame.getContext("2d", { willReadFrequently: true });
const status = document.getElementById("status");

const demo = { lastInput: null, lastTarget: null, lastLogits: null, lastRelevance: null };
window.lrpDemo = demo;

let ort = null;
let session = null;
let imageInput = null;
demo.ready = (async () => {
  try {
    ort = await import(ORT_DIST + "ort.wasm.min.mjs");
  } catch (error) {
    throw new Error(`could not load onnxruntime-web from ${ORT_DIST} (run npm ci at the repository root and ` +
                    `serve the repository root, not web/): ${error.message}`);
  }
  ort.env.wasm.wasmPaths = ORT_DIST;
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation headers a plain static server lacks
  session = await ort.InferenceSession.create(MODEL_URL, { executionProviders: ["wasm"] });
  imageInput = session.inputNames.find((name) => name !== TARGET_INPUT);
})();

// Explain one 8×8 image (64 floats in [0, 1]) for class `target` (-1: the predicted class).
demo.explain = async (input, target = -1) => {
  await demo.ready;
  const outputs = await session.run({
    [imageInput]: new ort.Tensor("float32", input, [1, 1, GRID, GRID]),
    [TARGET_INPUT]: new ort.Tensor("int64", BigInt64Array.of(BigInt(target)), [1]),
  });
  const result = { input, target, logits: outputs.logits.data, relevance: outputs.relevance.data,
                   explainedClass: Number(outputs.explained_class.data[0]) };
  Object.assign(demo, { lastInput: input, lastTarget: target, lastLogits: result.logits,
                        lastRelevance: result.relevance });
  return result;
};

// ---- drawing ---------------------------------------------------------------------------------

let strokes = []; // each an array of [x, y] in pad units
let activeStroke = null;
let activePointer = null; // the one pointer that draws (a second finger is ignored)
let liveTimer = null;

function drawStrokes(context, toCanvas, width) {
  context.strokeStyle = context.fillStyle = "#000";
  context.lineWidth = width;
  context.lineCap = context.lineJoin = "round";
  for (const stroke of strokes) {
    const points = stroke.map(toCanvas);
    context.beginPath();
    if (points.length === 1) { // a tap: canvases drop zero-length lines, so draw the dot itself
      context.arc(points[0][0], points[0][1], width / 2, 0, 2 * Math.PI);
      context.fill();
      continue;
    }
    context.moveTo(...points[0]);
    for (const point of points.slice(1)) context.lineTo(...point);
    context.stroke();
  }
}

function redrawPad() {
  // Sharp on high-density screens: the canvas's pixels follow its displayed size.
  const box = pad.getBoundingClientRect();
  const pixels = Math.round(box.width * devicePixelRatio) || PAD_SIZE;
  if (pad.width !== pixels) pad.width = pad.height = pixels;
  padContext.clearRect(0, 0, pixels, pixels);
  const scale = pixels / PAD_SIZE;
  drawStrokes(padContext, ([x, y]) => [x * scale, y * scale], PAD_PEN * pixels);
}

// The drawing as the model's input, or null when nothing is drawn.
function drawingAsInput() {
  const points = strokes.flat();
  if (!points.length) return null;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [left, right, top, bottom] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const pen = FRAME_PEN * FRAME;
  const scale = (FRAME - pen) / Math.max(right - left, bottom - top, 1e-3);
  const [cx, cy] = [(left + right) / 2, (top + bottom) / 2];
  frameContext.clearRect(0, 0, FRAME, FRAME);
  drawStrokes(frameContext, ([x, y]) => [FRAME / 2 + (x - cx) * scale, FRAME / 2 + (y - cy) * scale], pen);
  const alpha = frameContext.getImageData(0, 0, FRAME, FRAME).data;
  const input = new Float32Array(GRID * GRID);
  for (let row = 0; row < FRAME; row++) {
    for (let col = 0; col < FRAME; col++) {
      input[Math.floor(row / BLOCK) * GRID + Math.floor(col / BLOCK)] += alpha[(row * FRAME + col) * 4 + 3];
    }
  }
  return input.map((ink) => ink / (255 * BLOCK * BLOCK));
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * PAD_SIZE / box.width, (event.clientY - box.top) * PAD_SIZE / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  if (activePointer !== null) return;
  activePointer = event.pointerId;
  pad.setPointerCapture(event.pointerId);
  activeStroke = [padPoint(event)];
  strokes.push(activeStroke);
  redrawPad();
  requestUpdate();
});

pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== activePointer) return;
  activeStroke.push(padPoint(event));
  redrawPad();
  liveTimer ??= setTimeout(() => { liveTimer = null; requestUpdate(); }, LIVE_INTERVAL_MS);
});

function endStroke(event) {
  if (event.pointerId !== activePointer) return;
  activePointer = activeStroke = null;
  clearTimeout(liveTimer);
  liveTimer = null;
  requestUpdate();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  strokes = [];
  redrawPad();
  requestUpdate();
});

// ---- explaining the drawing ------------------------------------------------------------------

let pinnedClass = -1; // the class chosen in the table, or -1 to explain the prediction
let updating = null; // the running update loop's promise
let stale = false; // the drawing or the chosen class changed since the loop last read them

// One run at a time: changes during a run are coalesced into one run on the latest drawing.
function requestUpdate() {
  stale = true;
  updating ??= updateLoop().finally(() => { updating = null; });
  return updating;
}

async function updateLoop() {
  try {
    await demo.ready;
    while (stale) {
      stale = false;
      const input = drawingAsInput();
      if (!input) { showBlank(); continue; }
      const start = performance.now();
      const result = await demo.explain(input, pinnedClass);
      showResult(result);
      status.textContent = `Explained in ${(performance.now() - start).toFixed(1)} ms.`;
    }
  } catch (error) {
    status.textContent = `Error: ${error.message}`;
    status.classList.add("error");
  }
}

demo.settled = async () => {
  await demo.ready;
  while (updating) await updating;
};

// ---- showing results -------------------------------------------------------------------------

const inputView = document.getElementById("input");
const heatmapView = document.getElementById("heatmap");
const prediction = document.getElementById("prediction");
const explainedLabel = document.getElementById("explained");
const scaleLow = document.getElementById("scale-low");
const scaleHigh = document.getElementById("scale-high");
const rows = [];
const tableBody = document.querySelector("#classes tbody");
for (let k = 0; k < CLASSES; k++) {
  const row = tableBody.insertRow();
  row.innerHTML = `<td><button type="button">${k}</button></td><td class="probability"></td>` +
                  `<td class="bar"><span></span></td><td class="logit"></td>`;
  row.querySelector("button").addEventListener("click", () => {
    pinnedClass = pinnedClass === k ? -1 : k;
    requestUpdate();
  });
  rows.push(row);
}

function paintCells(canvas, colours) {
  const context = canvas.getContext("2d");
  const cell = canvas.width / GRID;
  colours.forEach((colour, i) => {
    context.fillStyle = colour;
    context.fillRect((i % GRID) * cell, Math.floor(i / GRID) * cell, cell, cell);
  });
}

// Blue (−scale) through white (0) to red (+scale).
function diverging(value, scale) {
  const t = Math.max(-1, Math.min(1, value / scale));
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(255,${fade},${fade})` : `rgb(${fade},${fade},255)`;
}

function showResult({ input, logits, relevance, explainedClass }) {
  const grey = (ink) => { const v = Math.round(255 * (1 - ink)); return `rgb(${v},${v},${v})`; };
  paintCells(inputView, Array.from(input, grey));
  const scale = Math.max(...relevance.map(Math.abs)) || 1;
  paintCells(heatmapView, Array.from(relevance, (r) => diverging(r, scale)));
  scaleLow.textContent = `−${scale.toPrecision(2)}`;
  scaleHigh.textContent = `+${scale.toPrecision(2)}`;

  const peak = Math.max(...logits);
  const exps = logits.map((z) => Math.exp(z - peak));
  const total = exps.reduce((a, b) => a + b, 0);
  const predicted = logits.indexOf(peak);
  prediction.textContent = String(predicted);
  explainedLabel.textContent = `for class ${explainedClass}` + (pinnedClass === -1 ? " (predicted)" : " (chosen)");
  rows.forEach((row, k) => {
    const probability = exps[k] / total;
    row.querySelector(".probability").textContent = `${(100 * probability).toFixed(1)} %`;
    row.querySelector(".bar span").style.width = `${100 * probability}%`;
    row.querySelector(".logit").textContent = logits[k].toFixed(2);
    row.classList.toggle("predicted", k === predicted);
    row.classList.toggle("explained", k === explainedClass);
  });
}

function showBlank() {
  Object.assign(demo, { lastInput: null, lastTarget: null, lastLogits: null, lastRelevance: null });
  for (const view of [inputView, heatmapView]) view.getContext("2d").clearRect(0, 0, view.width, view.height);
  prediction.textContent = "—";
  explainedLabel.textContent = "—";
  scaleLow.textContent = "−";
  scaleHigh.textContent = "+";
  for (const row of rows) {
    for (const cell of row.querySelectorAll(".probability, .logit")) cell.textContent = "";
    row.querySelector(".bar span").style.width = "0";
    row.classList.remove("predicted", "explained");
  }
}

demo.ready.then(
  () => { status.textContent = `Ready: ONNX Runtime Web ${ort.env.versions.web}, WASM, 1 thread. Draw a digit.`; },
  (error) => { status.textContent = `Error: ${error.message}`; status.classList.add("error"); },
);
redrawPad();
showBlank();
addEventListener("resize", redrawPad);
