# Sourced by launch/slurm/*.sbatch (and launch/sagemaker/entry.sh) on every node: the runtime
# settings for JAX on 8×A100 nodes joined by EFA (p4d.24xlarge-like). Each line says why.

# JAX preallocates 75% of GPU memory by default; the plan budgets against the whole 80 GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

# XLA:GPU scheduling. The plan's step-time estimate assumes FSDP traffic inside the scans (weight
# all-gathers, gradient reduce-scatters across nodes) overlaps with compute; these flags make that
# happen (zero1's once-per-step gather and reduce-scatter it counts as exposed):
#  - latency_hiding_scheduler: issue collectives early and compute while they fly;
#  - highest_priority_async_stream: run collectives on a high-priority stream so compute
#    kernels do not starve them;
#  - pipelined_{all_gather,reduce_scatter,all_reduce} + while_loop_double_buffering: inside the
#    scanned layer stack, gather layer i+1's weights (and reduce layer i-1's gradients) during
#    layer i, instead of at the start of each iteration;
#  - *_combine_threshold_bytes (128 MiB): merge the many per-tensor collectives of one layer
#    into a few large ones, which reach the link bandwidth (small NCCL calls are latency-bound);
#  - threshold_for_windowed_einsum_mib=0 + multi_streamed_windowed_einsum (collective matmul, as
#    in MaxText's and NVIDIA JAX-Toolbox's GPU recipes): split every all-gather→matmul and
#    matmul→reduce-scatter pair over 'tensor' into chunks passed around the ring while the
#    previous chunk multiplies, on separate streams. It applies where the partitioner emits those
#    pairs (activations split over 'tensor': sequence parallelism, sharding_rules 'length' →
#    'tensor', as configs/80b.py sets); plain Megatron tensor-parallel all-reduces are not such
#    pairs, so the plan counts them as exposed (python -m idefics_jax.plan prints which collectives
#    it counts as overlapped).
export XLA_FLAGS="${XLA_FLAGS:-} \
  --xla_gpu_enable_latency_hiding_scheduler=true \
  --xla_gpu_enable_highest_priority_async_stream=true \
  --xla_gpu_enable_pipelined_all_gather=true \
  --xla_gpu_enable_pipelined_reduce_scatter=true \
  --xla_gpu_enable_pipelined_all_reduce=true \
  --xla_gpu_enable_while_loop_double_buffering=true \
  --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
  --xla_gpu_threshold_for_windowed_einsum_mib=0 \
  --xla_gpu_multi_streamed_windowed_einsum=true"

# NCCL over EFA (libfabric + the aws-ofi-nccl plugin, installed with the EFA driver):
#  - FI_PROVIDER=efa: use the EFA provider, not TCP sockets;
#  - FI_EFA_USE_DEVICE_RDMA=1: GPUDirect RDMA (A100 ↔ NIC without a host copy; p4d supports it);
#  - FI_EFA_FORK_SAFE=1: Python data workers fork; keep libfabric's registered memory safe;
#  - NCCL_SOCKET_IFNAME: the interface for NCCL's bootstrap (not loopback or docker bridges);
#  - NCCL_DEBUG=WARN: quiet, but say so when NCCL falls back to sockets (a 10× slower run).
export FI_PROVIDER=${FI_PROVIDER:-efa}
export FI_EFA_USE_DEVICE_RDMA=${FI_EFA_USE_DEVICE_RDMA:-1}
export FI_EFA_FORK_SAFE=${FI_EFA_FORK_SAFE:-1}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# The coordinator of jax.distributed listens on the first node (idefics_jax/distributed.py).
export JAX_COORDINATOR_PORT=${JAX_COORDINATOR_PORT:-8476}
