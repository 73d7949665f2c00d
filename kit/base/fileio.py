"""Files written whole or not at all: a temporary file beside the target, flushed and fsynced, then renamed over it,
so a reader (or a crash, or a full disk) never leaves half a file. The split lists, config.json, summary.json,
metrics.csv, curves.png and every checkpoint are written through here; it needs nothing but the standard library,
so the data preparation uses it without loading torch.

    fileio.write_atomic("line one\n", "data/Caltech101/classes.txt")   # str or bytes
    with fileio.replacing("checkpoints/run/last.pth") as f:            # a file object; renamed into place on exit
        torch.save(state, f)
"""
import contextlib
import os
import threading


@contextlib.contextmanager
def replacing(path, mode="wb"):
    """A file object for `path`'s new content. On a clean exit it replaces `path` in one rename; on any error or
    interruption the previous file stays byte-identical and no temporary file is left behind."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"  # the background writer and the main thread apart
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:  # text: UTF-8 on every system
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(data, path):
    """A text (str) or binary (bytes) file written whole."""
    with replacing(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
