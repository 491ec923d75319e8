"""SageMaker entry point: runs the trainer on every host of a multi-node training job.

SageMaker starts this script once per instance with SM_HOSTS / SM_CURRENT_HOST set, which
`idefics_jax.distributed` turns into `jax.distributed.initialize` (coordinator: the first host).
The `data` channel holds tokenizer/ obelics/ laion/ wikipedia/ pmd/ (as launch/slurm/80b.sbatch
expects under $DATA), the `init` channel the checkpoint written by tools/convert_weights.py. The run
directory is /opt/ml/checkpoints, which SageMaker syncs with `checkpoint_s3_uri`: a restarted job
(spot interruption, a new job with the same URI) resumes from the newest complete checkpoint.
Hyperparameters arrive as `--key value` arguments and are passed on; use them for config overrides,
e.g. {"config": "configs/80b.py", "config.train.steps": 40000}. The runtime flags are
launch/slurm/env.sh's, sourced here too.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def command(argv: list[str], env: dict[str, str]) -> list[str]:
    """The bash command that sources env.sh and execs the trainer with our paths and `argv`."""
    data = env.get("SM_CHANNEL_DATA", "/opt/ml/input/data/data")
    init = env.get("SM_CHANNEL_INIT", "/opt/ml/input/data/init")
    config = "configs/80b.py"
    if "--config" in argv:  # a hyperparameter {"config": ...} arrives as "--config X"
        i = argv.index("--config")
        config, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    train = [
        sys.executable,
        "-m",
        "idefics_jax.train",
        "--config",
        config,
        "--workdir",
        "/opt/ml/checkpoints",
        f"--config.train.init_from={init}",
        f"--config.data.tokenizer_path={data}/tokenizer",
        f"--config.data.datasets.obelics.paths={data}/obelics/*.parquet",
        f"--config.data.datasets.laion.paths={data}/laion/*.tar",
        f"--config.data.datasets.wikipedia.paths={data}/wikipedia/*.parquet",
        f"--config.data.datasets.pmd.paths={data}/pmd/*.tar",
        *argv,
    ]
    return ["bash", "-c", 'source launch/slurm/env.sh && exec "$@"', "entry", *train]


if __name__ == "__main__":
    os.chdir(REPO)
    cmd = command(sys.argv[1:], dict(os.environ))
    os.execvp(cmd[0], cmd)
