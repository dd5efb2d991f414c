// Tensors cross between Python and JavaScript as raw little-endian files described by a JSON
// request: {name, dtype, shape, file}. Shared by the Node runner and the Chromium page.
export const ARRAYS = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array, int64: BigInt64Array,
  int32: Int32Array, int8: Int8Array, uint8: Uint8Array, bool: Uint8Array,
};

export function tensorFromBytes(ort, spec, bytes) {
  const Array = ARRAYS[spec.dtype];
  if (!Array) throw new Error(`unsupported dtype ${spec.dtype} for input ${spec.name}`);
  const data = new Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / Array.BYTES_PER_ELEMENT);
  return new ort.Tensor(spec.dtype, spec.dtype === "bool" ? Uint8Array.from(data) : data, spec.shape);
}

export function tensorBytes(tensor) {
  const data = tensor.data;
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

// Median seconds of `repeats` runs after one warm-up run; returns the warm-up's outputs.
export async function timedRuns(session, feeds, repeats) {
  const outputs = await session.run(feeds);
  const times = [];
  for (let k = 0; k < repeats; k++) {
    const start = performance.now();
    await session.run(feeds);
    times.push((performance.now() - start) / 1000);
  }
  times.sort((a, b) => a - b);
  return { outputs, seconds: times.length ? times[Math.floor(times.length / 2)] : null };
}
