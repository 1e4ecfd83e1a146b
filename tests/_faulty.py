"""Run the ASR recipe, SIGKILLing itself around the training checkpoint of step $KILL_AT.

KILL_MODE=after: right after that checkpoint is written; KILL_MODE=during: halfway through writing it.
"""
import os
import signal
import sys

sys.path.insert(0, os.environ["CSPRUNE_REPO"])
import torch  # noqa: E402

from recipes.asr import run as recipe  # noqa: E402

kill_at, mode = int(os.environ["KILL_AT"]), os.environ["KILL_MODE"]
original = recipe.save_checkpoint


def save_checkpoint(state, path, keep_last=None):
    step = state.get("progress", {}).get("step")
    if step == kill_at and mode == "during":
        def torn_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = torn_save
    out = original(state, path, keep_last=keep_last)
    if step == kill_at and mode == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out


recipe.save_checkpoint = save_checkpoint
import hydra  # noqa: E402

hydra.main(config_path=os.path.join(os.environ["CSPRUNE_REPO"], "conf"), config_name="asr", version_base="1.3")(recipe.run)()
