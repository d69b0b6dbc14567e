"""A Python with the project's libraries already imported, that runs each script in a fresh fork of itself.

`helpers.run_script` uses it on a machine without a GPU: a script run costs its own work instead of ~8 s of
importing torch, diffusers, peft and bitsandbytes first (3.5 s instead of 11 s for a 2-step tiny run, measured on the
2-core CI machine; the suite took 700 s instead of 782 s there, ~10%). Each run is still a process of its own,
started as `python script.py args` would be: its own argv, environment, working folder, stdout and stderr, exit code
or signal, and a fresh interpreter state past the imports. Not used where CUDA is: a fork of a process that touched
CUDA can't use it.

Protocol, a JSON line each way: {"script", "argv", "env", "cwd", "stdout", "stderr"} in; {"pid"} when the run
started, then {"returncode"} when it ended.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_libraries() -> None:
    """What the scripts import at their top and load lazily later (the models' classes): imported once here."""
    sys.path.insert(0, str(ROOT))
    import bitsandbytes  # noqa: F401
    import diffusers
    import peft  # noqa: F401
    import transformers

    import compute_embeddings  # noqa: F401
    import infer  # noqa: F401
    import train_qlora_flux  # noqa: F401

    for name in ("FluxTransformer2DModel", "AutoencoderKL", "FluxPipeline", "FlowMatchEulerDiscreteScheduler"):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTokenizer", "T5EncoderModel", "T5TokenizerFast"):
        getattr(transformers, name)
    # What every training run imports late: its scheduler, pyarrow's read_table of the embeddings (pandas and
    # pyarrow.dataset, ~0.8 s) and the loss plot (matplotlib, ~1 s, with the backend reports.plot_loss sets): a
    # 1-step tiny run took 2.3 s instead of 3.7 s once these were imported here too.
    import matplotlib
    import pandas  # noqa: F401
    import pyarrow.dataset  # noqa: F401
    from diffusers.optimization import get_scheduler  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    sys.path.pop(0)


def run(request: dict) -> None:
    """In the fork: become `python script argv...` and never return (the script's exit is this process's)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    script = request["script"]
    sys.argv = [script, *request["argv"]]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python script` puts it first
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # this process's own prints go with its log, never into the replies
    import_libraries()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush(), sys.stderr.flush()  # nothing of this process's buffers is written again by the fork
        pid = os.fork()
        if pid == 0:
            replies.close()
            run(request)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


if __name__ == "__main__":
    serve()
