"""The DALI data path: JPEG decode, crop, resize, flip and normalise in one pipeline; on a GPU the decoder runs with
device='mixed' (nvJPEG, and the A100/H100 hardware decoder) and every operator after it on the GPU, elsewhere the
same graph runs on DALI's CPU operators (device_id=None).

    loader = dali_loader.DaliLoader(image_root, files, labels, plan, img_size=224, device=torch.device("cuda"))
    for images, labels in loader: ...      # NCHW (channels_last) in the AMP dtype, on the device; labels int64

The pipeline does not choose images or crops itself: an external source feeds it, step by step, the encoded
bytes the shared sampling.SamplePlan names, with each image's crop box and flip. Train: decode only the crop box
(decoders.image_slice), resize it to img_size or the epoch's size (antialiased), flip, normalise. Val/test:
decode, resize the shorter side to img_size*256/224, centre crop, normalise. The stream runs on across epochs
(the next epoch's first batches are decoded while this one ends, at that epoch's size); its position is (epoch,
batches done), so resuming is exact.
"""
import collections
import functools
import os
import sys

import numpy as np
import torch

from kit.base import errors
from kit.data import sampling, splits

try:
    import nvidia.dali
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    HAVE_DALI, VERSION = True, nvidia.dali.__version__
except ImportError:  # macOS / Windows / no DALI wheel: the torch loader still works
    HAVE_DALI, VERSION = False, None
INSTALL = "pip install nvidia-dali-cuda120: Linux wheels only"

PRELOAD_BYTES = 2 << 30  # keep a split's encoded files in memory up to this size (Caltech-101: 116 MB); else read


def dali_device_id(device):
    """The GPU the pipeline runs on: the device's own index, else the current CUDA device (set per rank by
    torch.cuda.set_device); None runs the CPU operators."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def check_workers(workers):
    if workers < 1:
        raise errors.DataError(f"--workers {workers}: the DALI loader needs at least 1 thread (use --workers 1 or "
                               f"more, or --loader torch, where 0 loads in the main process)")


class EncodedFiles:
    """The split's files as bytes: read once into memory when they fit PRELOAD_BYTES, else read per batch."""

    def __init__(self, root, files):
        self.paths = [os.path.join(root, f) for f in files]
        total = sum(os.path.getsize(p) for p in self.paths)
        self.blobs = [np.fromfile(p, dtype=np.uint8) for p in self.paths] if total <= PRELOAD_BYTES else None

    def __getitem__(self, i):
        return self.blobs[i] if self.blobs is not None else np.fromfile(self.paths[i], dtype=np.uint8)


class PlanSource:
    """The pipeline's external source: each call returns the next step of the plan, epoch after epoch.

    Train outputs: encoded bytes, crop anchor (x, y) and shape (w, h) in pixels, flip and output size (the epoch's:
    SamplePlan.out_size)[, label]; val: bytes[, label] (labels=None: no label output; img_size=None: no flip or
    size output, for the first-step pipeline). `recent` keeps the last few batches, to name the file a decode
    error came from.
    """

    def __init__(self, plan, encoded, labels, epoch, step, img_size=None):
        self.plan, self.encoded, self.img_size = plan, encoded, img_size
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.epoch, self.steps = epoch, plan.epoch(epoch, step)
        self.recent = collections.deque(maxlen=4)

    def __call__(self):
        batch = next(self.steps, None)
        while batch is None:  # the epoch is over: the stream goes on with the next one
            self.epoch += 1
            self.steps = self.plan.epoch(self.epoch)
            batch = next(self.steps, None)
        index = batch["index"]
        self.recent.append(index)
        out = [[self.encoded[i] for i in index]]
        if self.plan.train:
            out += [np.stack([batch["x"], batch["y"]], 1).astype(np.float32),
                    np.stack([batch["w"], batch["h"]], 1).astype(np.float32)]
            if self.img_size is not None:
                size = self.plan.out_size(self.epoch, self.img_size)
                out += [batch["flip"].astype(np.int32), np.full(len(index), size, np.float32)]
        if self.labels is not None:
            out.append(self.labels[index])
        return tuple(out)


if HAVE_DALI:
    def decode(jpegs, decoder_device, anchor=None, shape=None, hw_decoder_load=sampling.HW_DECODER_LOAD):
        """Decode to uint8 RGB, only the (anchor, shape) box when given. Fancy chroma upsampling on both devices, so
        that the GPU decoder gives the CPU decoder's pixels (its default differs)."""
        common = dict(device=decoder_device, output_type=types.RGB, jpeg_fancy_upsampling=True)
        if decoder_device == "mixed":
            common["hw_decoder_load"] = hw_decoder_load
        if anchor is None:
            return fn.decoders.image(jpegs, **common)
        return fn.decoders.image_slice(jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                       axis_names="WH", **common)

    def normalize(images, img_size, mirror, layout, crop=None):
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, crop=crop,
                                        mean=[m * 255 for m in splits.IMAGENET_MEAN],
                                        std=[s * 255 for s in splits.IMAGENET_STD], mirror=mirror)

    @pipeline_def
    def caltech_pipeline(source, train, img_size, decoder_device, layout, hw_decoder_load):
        if train:
            jpegs, anchor, shape, mirror, size, labels = fn.external_source(source=source, num_outputs=6, batch=True)
            images = decode(jpegs, decoder_device, anchor, shape, hw_decoder_load)
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
            return normalize(images, img_size, mirror, layout), labels
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True)
        images = fn.resize(decode(jpegs, decoder_device, hw_decoder_load=hw_decoder_load),
                           resize_shorter=splits.resize_size(img_size), antialias=True)
        return normalize(images, img_size, 0, layout, crop=(img_size, img_size)), labels

    @pipeline_def
    def first_step_pipeline(source, train, shorter, img_size, decoder_device):
        """The pipeline's first step alone, as uint8: train decodes the plan's crop boxes (bench.py times it as the
        pipeline's ceiling); val decodes, resizes the shorter side and centre-crops (the --cache decode pass of
        val/test). `shorter=None` with train=False decodes whole images (the cache decode pass of train)."""
        if train:
            jpegs, anchor, shape = fn.external_source(source=source, num_outputs=3, batch=True)
            return decode(jpegs, decoder_device, anchor, shape)
        (jpegs,) = fn.external_source(source=source, num_outputs=1, batch=True)
        images = decode(jpegs, decoder_device)
        if shorter is None:
            return images
        return fn.crop(fn.resize(images, resize_shorter=shorter, antialias=True), crop=(img_size, img_size))


def decode_error(err, recent_files):
    """A DataError naming the file DALI failed on: DALI's message names a sample of a batch in flight, so the files
    of those batches are tried with PIL and the first one that does not decode is named."""
    for batch in recent_files:
        for path in batch:
            try:
                splits.load_rgb(path)
            except errors.DataError as e:
                return errors.DataError(f"{e}; re-run download.py (it re-checks every image) or remove it from the "
                                        f"split lists")
    text = str(err).strip()
    return errors.DataError(f"the DALI pipeline failed: {text.splitlines()[-1] if text else repr(err)}")


class DaliLoader(sampling.PlanPosition):
    """Iterates the DALI pipeline as (images, labels) model inputs, `len()` batches per epoch, following `plan`.

    state_dict()/load_state_dict() hold the stream position (epoch, batches done) at any step.
    """
    kind = "dali"

    def __init__(self, image_root, files, labels, plan, device, data=sampling.DataSettings()):
        if not HAVE_DALI:
            raise errors.DataError(f"DALI is not installed ({INSTALL}): use --loader torch or auto")
        check_workers(data.workers)
        self.image_root, self.files, self.labels, self.plan = image_root, files, labels, plan
        self.img_size, self.device, self.dtype, self.workers = data.size(plan.train), device, data.dtype, data.workers
        self.channels_last, self.hw_decoder_load = data.channels_last, data.hw_decoder_load
        self.encoded = EncodedFiles(image_root, files)
        self.num_images = plan.num_local
        self.epoch, self.batches_done = 0, 0
        self.stream = None  # (pipeline, iterator, source) positioned at self.stream_at
        self.stream_at = None

    def _start(self):
        """A pipeline whose stream starts at (epoch, batches_done)."""
        source = PlanSource(self.plan, self.encoded, self.labels, self.epoch, self.batches_done, self.img_size)
        on_gpu = self.device.type == "cuda"
        pipe = caltech_pipeline(source, self.plan.train, self.img_size, "mixed" if on_gpu else "cpu",
                                "HWC" if self.channels_last else "CHW", self.hw_decoder_load,
                                batch_size=self.plan.batch_size, num_threads=self.workers,
                                device_id=dali_device_id(self.device), seed=self.plan.seed, prefetch_queue_depth=2)
        try:
            pipe.build()
            iterator = DALIGenericIterator([pipe], ["images", "labels"], size=-1, auto_reset=False)
        except RuntimeError as e:
            raise self._error(e, source) from None
        self.stream, self.stream_at = (pipe, iterator, source), (self.epoch, self.batches_done)

    def _error(self, err, source):
        return decode_error(err, [[os.path.join(self.image_root, self.files[i]) for i in batch]
                                  for batch in source.recent])

    def __iter__(self):
        if self.stream_at != (self.epoch, self.batches_done):  # first use, a resume, or an abandoned pass
            self._start()
        _, iterator, source = self.stream
        for _ in range(self.batches_done, self.plan.steps):
            try:
                batch = next(iterator)[0]
            except RuntimeError as e:
                self.stream_at = None
                raise self._error(e, source) from None
            self.epoch, self.batches_done = sampling.next_position(self.epoch, self.batches_done, self.plan.steps)
            self.stream_at = (self.epoch, self.batches_done)
            # The labels are host memory DALI reuses; a copy of our own makes the asynchronous transfer safe.
            yield splits.to_model_input(batch["images"], batch["labels"].clone(), self.device, self.dtype,
                                        self.channels_last)


def first_step_pipe(image_root, files, plan, device, workers, train, shorter=None, img_size=None):
    """A built first_step_pipeline over `files` following `plan`; run it with epoch_batches()."""
    check_workers(workers)
    source = PlanSource(plan, EncodedFiles(image_root, files), None, 0, 0)
    pipe = first_step_pipeline(source, train, shorter, img_size, "mixed" if device.type == "cuda" else "cpu",
                               batch_size=plan.batch_size, num_threads=workers, device_id=dali_device_id(device),
                               prefetch_queue_depth=2)
    pipe.build()
    pipe.source = source
    return pipe


def epoch_batches(pipe, steps, image_root, files):
    """`steps` batches of a first-step pipeline, each a list of uint8 HWC numpy arrays (on the host)."""
    try:
        for _ in range(steps):
            (out,) = pipe.run()
            out = out.as_cpu() if hasattr(out, "as_cpu") else out  # GPU-decoded: to the host once
            yield [np.array(out.at(i)) for i in range(len(out))]
    except RuntimeError as e:
        raise decode_error(e, [[os.path.join(image_root, files[i]) for i in b] for b in pipe.source.recent]) from None


@functools.lru_cache(maxsize=None)  # once per device and process: every loader build asks
def decodes_a_jpeg(device):
    """(ok, what happened): a tiny JPEG through DALI's decoder on the device (nvJPEG, device='mixed', on a GPU):
    what doctor.py asks before a run would."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, format="JPEG")
    jpeg = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    decoder = "mixed" if device.type == "cuda" else "cpu"

    @pipeline_def(batch_size=1, num_threads=1, device_id=dali_device_id(device))
    def one_image():
        return decode(fn.external_source(source=lambda: [jpeg], batch=True), decoder)

    try:
        pipe = one_image()
        pipe.build()
        (out,) = pipe.run()
        out = out.as_cpu() if hasattr(out, "as_cpu") else out
        shape = tuple(np.array(out.at(0)).shape)
    except RuntimeError as e:
        return False, f"the {decoder} decoder failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
    return shape == (12, 16, 3), f"a 16x12 JPEG decoded to {shape[1]}x{shape[0]} with the {decoder} decoder"


def release_unused_memory():
    """Give DALI's cached device memory back after a one-off GPU decode pass (the cache keeps its own copy)."""
    if HAVE_DALI:
        from nvidia.dali.backend import ReleaseUnusedMemory

        ReleaseUnusedMemory()


class QuietDecoderErrors:
    """Drops the lines DALI's image decoders write to stderr themselves when a file does not decode ("[ERROR]
    [libjpeg_turbo_decoder] ..."): the loader then raises one errors.DataError naming the file, and a user error stays
    one line. Everything else written to stderr passes through unchanged and in order. The decoders write from
    DALI's own threads, so this filters file descriptor 2 through a pipe for as long as it is active."""

    MARKERS = ("_decoder] ", "[nvimgcodec]")

    def __enter__(self):
        import threading

        sys.stderr.flush()
        self.saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(target=self._copy, args=(read_end,), daemon=True)
        self.thread.start()
        return self

    def _copy(self, read_end):
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._forward(line + b"\n")
            if pending:
                self._forward(pending)

    def _forward(self, data):
        text = data.decode("utf-8", "replace")
        if "[ERROR]" in text and any(marker in text for marker in self.MARKERS):
            return
        os.write(self.saved, data)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # closes the pipe's last write end: the copier sees the end and stops
        self.thread.join(timeout=5)
        os.close(self.saved)
        return False
