"""Runs train_caltech101's command line as torchrun (or python) would, for tests that need the real process.
KIT_TEST_BN_EVAL=1: BatchNorm runs in eval mode during training too, so a batch's update does not depend on how the
batch is split across ranks (the DDP weights-equivalence test). KIT_TEST_SLOW_END=S: the end-of-run work prints
"end-of-run work" and waits S seconds before it starts, so a test can send a signal inside it. Every other part is
the kit's own. KIT_TEST_NAN_AT=K: rank 0's K-th training step gets a NaN pixel (the other ranks' batches stay
clean; rank 0's BatchNorm statistics are the ones DDP broadcasts and the checkpoints hold)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model_utils  # noqa: E402
import train_caltech101  # noqa: E402
from kit.training import (
    engine,  # noqa: E402
    training,  # noqa: E402
)

if os.environ.get("KIT_TEST_BN_EVAL") == "1":
    def eval_bn(model, trainable, frozen_bn="eval"):
        model_utils.unwrap(model).eval()

    model_utils.set_train_mode = eval_bn

if os.environ.get("KIT_TEST_SLOW_END"):
    real_finish = training.finish_run

    def slow_finish(*args, **kwargs):
        print("end-of-run work", flush=True)
        time.sleep(float(os.environ["KIT_TEST_SLOW_END"]))
        return real_finish(*args, **kwargs)

    training.finish_run = slow_finish

if os.environ.get("KIT_TEST_NAN_AT") and os.environ.get("RANK") == "0":
    real_step, calls = engine.train_step, []

    def poisoned_step(model, images, *args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ["KIT_TEST_NAN_AT"]):
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        return real_step(model, images, *args, **kwargs)

    engine.train_step = poisoned_step

if __name__ == "__main__":
    sys.exit(train_caltech101.cli())
