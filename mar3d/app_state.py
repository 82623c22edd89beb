"""One demo request in flight: the pipeline runs in a worker thread and reports back as events.

    for kind, value in stream_pipeline(pipe, "photo.png", Settings(seed=1)):
        kind == "progress"  ->  value = (stage, step, total)   stage "lr" or "hr"
        kind == "lr_mesh"   ->  value = the LR preview mesh (or None if it came out empty)
        kind == "result"    ->  value = the pipeline's Result (always the last event)

The pipeline reports progress and its preview through callbacks, from inside one blocking call;
a UI that shows them as they come (a Gradio generator) needs them as an iterator instead, in its
own thread. An exception from the pipeline is re-raised by the iterator. Closing the iterator
early (the browser went away) makes the worker stop at its next sampling step.
"""

import queue
import threading
from typing import Iterator


class Abandoned(Exception):
    """Raised inside the worker to stop a pipeline run nobody is listening to any more."""


def stream_pipeline(pipe, image, settings, **overrides) -> Iterator[tuple[str, object]]:
    events: queue.Queue = queue.Queue()
    abandoned = threading.Event()

    def progress(stage, step, total):
        if abandoned.is_set():
            raise Abandoned
        events.put(("progress", (stage, step, total)))

    def work():
        try:
            result = pipe(image, settings, on_lr_mesh=lambda mesh: events.put(("lr_mesh", mesh)),
                          progress=progress, **overrides)
            events.put(("result", result))
        except BaseException as e:  # handed to the caller's thread, which decides what it means
            events.put(("error", e))

    threading.Thread(target=work, name="mar3d-pipeline", daemon=True).start()
    try:
        while True:
            kind, value = events.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "result":
                return
    finally:
        abandoned.set()
