"""Example: IDEFICS-80B as a SageMaker training job on 64 × ml.p4d.24xlarge (8 A100-80GB, 4×100 Gbit/s
EFA each), the cluster configs/80b.py and the plan assume.

    pip install sagemaker
    python launch/sagemaker/estimator.py --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/idefics-jax:latest \
        --role arn:aws:iam::123456789012:role/SageMakerTraining --data s3://bucket/idefics-data \
        --init s3://bucket/ckpt/idefics-80b-init --checkpoints s3://bucket/runs/80b

The image: a CUDA 12 + EFA base (e.g. an AWS Deep Learning Container for GPU training, which ships
libfabric and aws-ofi-nccl) with `pip install -e '.[gpu]'` of this repository and the
`sagemaker-training` toolkit. For 64 nodes, serving the data and the 320 GB init checkpoint from FSx
for Lustre (`sagemaker.inputs.FileSystemInput`) is faster than copying them from S3 to every node.
"""

from __future__ import annotations

import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def estimator(
    image: str,
    role: str,
    checkpoints: str,
    instances: int = 64,
    config: str = "configs/80b.py",
    overrides: dict | None = None,
):
    """A `sagemaker.pytorch.PyTorch` estimator (used only as a launcher for our image and entry point)."""
    from sagemaker.pytorch import PyTorch

    return PyTorch(
        entry_point="launch/sagemaker/entry.py",
        source_dir=REPO,
        image_uri=image,
        role=role,
        instance_type="ml.p4d.24xlarge",
        instance_count=instances,
        hyperparameters={"config": config, **(overrides or {})},
        checkpoint_s3_uri=checkpoints,  # synced with /opt/ml/checkpoints: resume on restart
        checkpoint_local_path="/opt/ml/checkpoints",
        max_run=5 * 24 * 3600,
        volume_size=500,  # GB of local disk per node
        environment={"NCCL_DEBUG": "WARN"},
        disable_profiler=True,
        debugger_hook_config=False,
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--data", required=True, help="S3 URI of tokenizer/ obelics/ laion/ wikipedia/ pmd/")
    p.add_argument("--init", required=True, help="S3 URI of the checkpoint from tools/convert_weights.py")
    p.add_argument("--checkpoints", required=True, help="S3 URI for the run's checkpoints")
    p.add_argument("--instances", type=int, default=64)
    a = p.parse_args()
    from sagemaker.inputs import TrainingInput

    est = estimator(a.image, a.role, a.checkpoints, a.instances)
    est.fit(
        {"data": TrainingInput(a.data, input_mode="FastFile"), "init": TrainingInput(a.init, input_mode="FastFile")},
        wait=False,
    )
    print(f"submitted {est.latest_training_job.name}")
