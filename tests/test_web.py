"""The browser demo (web/): a stroke drawn with the mouse in headless Chromium is explained by ONNX
Runtime Web exactly as ONNX Runtime Python explains the same input, and the explainer bundled with
the page is what `lrp-onnx convert` makes of the bundled CNN today.

The page test needs Node.js, `npm ci` at the repository root (the page loads onnxruntime-web from
its node_modules) and Chromium; .ci/run installs them, so in CI (CI set) a missing one fails
instead of skipping."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import onnxruntime as ort
import pytest

from lrp_onnx.cli import main
from lrp_onnx.runtimes import relative_l2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPLAINER = os.path.join(ROOT, "web", "digits_cnn.lrp.onnx")
MODEL = os.path.join(ROOT, "models", "digits_cnn.onnx")
DRIVER = os.path.join(ROOT, "tests", "web_driver.mjs")
TOLERANCE = 1e-5  # relative L2 against ONNX Runtime Python, as `lrp-onnx check` accepts
CHROMIUM = os.environ.get("LRP_ONNX_CHROMIUM") or shutil.which("chromium")


def _browser_missing():
    if not shutil.which("node"):
        return "node is not installed"
    if not CHROMIUM:
        return "chromium is not installed (apt-get install chromium, or set LRP_ONNX_CHROMIUM)"
    missing = [p for p in ("onnxruntime-web", "playwright-core")
               if not os.path.isfile(os.path.join(ROOT, "node_modules", p, "package.json"))]
    return f"run npm ci at the repository root: {', '.join(missing)} missing" if missing else None


needs_browser = pytest.mark.skipif(bool(_browser_missing()) and not os.environ.get("CI"),
                                   reason=str(_browser_missing()))


@pytest.fixture
def demo_url():
    """The repository root on a free local port, served as `python -m http.server` serves it."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=ROOT)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/web/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def explain_on_ort_python(path, images, targets):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images, "target": targets})))


@needs_browser
def test_the_page_explains_a_drawn_seven_as_onnx_runtime_python_does(demo_url):
    done = subprocess.run(["node", DRIVER, demo_url], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "LRP_ONNX_CHROMIUM": CHROMIUM or ""})
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout.strip().splitlines()[-1])
    assert page["errors"] == []
    image = np.asarray(page["input"], np.float32).reshape(1, 1, 8, 8)
    # The stroke reached the model as ink in [0, 1]: a blank or faint input would pass the comparison.
    assert image.min() >= 0 and image.max() <= 1 and (image > 0.5).sum() >= 8
    expected = explain_on_ort_python(EXPLAINER, image, np.array([page["target"]], np.int64))
    assert relative_l2(page["relevance"], expected["relevance"].ravel()) <= TOLERANCE
    assert relative_l2(page["logits"], expected["logits"].ravel()) <= TOLERANCE
    # The page shows the prediction, and it is right: an upside-down or transposed input would not be a 7.
    assert page["shownPrediction"] == str(int(expected["logits"].argmax())) == "7"


def test_the_bundled_explainer_is_a_fresh_conversion(tmp_path):
    fresh = str(tmp_path / "digits_cnn.lrp.onnx")
    assert main(["convert", MODEL, "-o", fresh]) == 0
    rng = np.random.default_rng(0)
    samples = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))
    images = np.concatenate([samples, rng.uniform(0, 1, (6, 1, 8, 8)).astype(np.float32)])
    targets = np.concatenate([np.full(len(samples), -1), rng.integers(0, 10, 6)]).astype(np.int64)
    bundled = explain_on_ort_python(EXPLAINER, images, targets)
    expected = explain_on_ort_python(fresh, images, targets)
    stale = "web/digits_cnn.lrp.onnx is stale: regenerate it as web/README.md says"
    assert set(bundled) == set(expected), stale
    for name, value in expected.items():
        assert relative_l2(bundled[name], value) <= TOLERANCE, (name, stale)
