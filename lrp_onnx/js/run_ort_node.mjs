// Runs an explainer on ONNX Runtime Node (npm onnxruntime-node): node run_ort_node.mjs REQUEST.json
// REQUEST: {model, inputs: [{name, dtype, shape, file}], folder, repeats}. Writes each output to
// FOLDER/<k>.bin and prints {outputs: [{name, dtype, shape, file}], seconds} as JSON.
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tensorFromBytes, tensorBytes, timedRuns } from "./tensors.mjs";

// Resolved from NODE_MODULES (the folder holding node_modules/onnxruntime-node), as Python passes it.
const ort = createRequire(join(process.env.LRP_ONNX_NODE_ROOT, "noop.js"))("onnxruntime-node");
const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const session = await ort.InferenceSession.create(request.model, { executionProviders: ["cpu"] });
const feeds = Object.fromEntries(request.inputs.map((spec) => [spec.name, tensorFromBytes(ort, spec, readFileSync(spec.file))]));
const { outputs, seconds } = await timedRuns(session, feeds, request.repeats);
const written = Object.entries(outputs).map(([name, tensor], k) => {
  const file = join(request.folder, `${k}.bin`);
  writeFileSync(file, tensorBytes(tensor));
  return { name, dtype: tensor.type, shape: tensor.dims, file };
});
console.log(JSON.stringify({ outputs: written, seconds }));
