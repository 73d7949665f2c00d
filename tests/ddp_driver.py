"""Runs train_caltech101's command line as torchrun (or python) would, for tests/test_ddp.py. With
KIT_TEST_BN_EVAL=1, BatchNorm runs in eval mode during training too, so a batch's update does not depend on how the
batch is split across ranks (the weights-equivalence test); every other part of the step is the kit's own."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model_utils  # noqa: E402
import train_caltech101  # noqa: E402

if os.environ.get("KIT_TEST_BN_EVAL") == "1":
    def eval_bn(model, trainable, frozen_bn="eval"):
        model_utils.unwrap(model).eval()

    model_utils.set_train_mode = eval_bn

if __name__ == "__main__":
    sys.exit(train_caltech101.cli())
