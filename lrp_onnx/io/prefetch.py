"""Pipelines of generators, each stage in its own thread: decoding, ONNX Runtime and writing
overlap, since each releases the GIL for most of its work."""

import queue
import threading

_DONE = object()


def prefetched(items, depth=2):
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the caller, so
    memory holds ``depth`` + 2 items at most (queued, being made, being used). An exception in the
    thread is raised in the caller; when the caller stops early, the thread stops too, and closes
    ``items``."""
    ready = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry):
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    break
            else:
                put((_DONE, None))
        except BaseException as error:  # handed to the caller, which raises it
            put((_DONE, error))
        finally:
            if hasattr(items, "close"):
                items.close()

    worker = threading.Thread(target=produce, name="lrp-onnx-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join()
