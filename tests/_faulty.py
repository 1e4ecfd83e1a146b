"""Run the ASR recipe with one injected fault at a chosen point (deterministic: no polling races).

Environment:
    FAULT: kill-after | kill-during   SIGKILL right after / halfway through the training checkpoint of step $FAULT_AT
           term                       SIGTERM to itself during the loss of call $FAULT_AT (preemption)
           nan                        the loss of call $FAULT_AT is NaN
           fsize-ckpt | fsize-export  the file-size limit (ulimit -f) drops to 0 just before the training
                                      checkpoint of step $FAULT_AT / the export: the kernel refuses the write (EFBIG)
    FAULT_AT: a global step, or the index of a loss call (one per step with one micro-batch per process).
"""
import os
import resource
import signal
import sys

sys.path.insert(0, os.environ["CSPRUNE_REPO"])
import torch  # noqa: E402

import csprune  # noqa: E402
import csprune.train.checkpoint as checkpoints  # noqa: E402  (training checkpoints are written through it)
from recipes.asr import run as recipe  # noqa: E402

at, fault = int(os.environ["FAULT_AT"]), os.environ["FAULT"]
original_save, original_loss, original_export = checkpoints.save_checkpoint, recipe._loss, csprune.save_sparse


def no_more_bytes() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def save_checkpoint(state, path, keep_last=None):
    step = state.get("progress", {}).get("step")
    if step == at and fault == "kill-during":
        def torn_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = torn_save
    if step == at and fault == "fsize-ckpt":
        no_more_bytes()
    out = original_save(state, path, keep_last=keep_last)
    if step == at and fault == "kill-after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out


def _loss(device):
    inner, calls = original_loss(device), [0]

    def loss_fn(model, batch):
        value = inner(model, batch)
        if calls[0] == at and fault == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        if calls[0] == at and fault == "nan":
            value = value * float("nan")
        calls[0] += 1
        return value

    return loss_fn


def save_sparse(*args, **kwargs):
    if fault == "fsize-export":
        no_more_bytes()
    return original_export(*args, **kwargs)


checkpoints.save_checkpoint, recipe._loss, csprune.save_sparse = save_checkpoint, _loss, save_sparse
import hydra  # noqa: E402

hydra.main(config_path=os.path.join(os.environ["CSPRUNE_REPO"], "conf"), config_name="asr", version_base="1.3")(recipe.main.__wrapped__)()  # the recipe's own main, unwrapped
