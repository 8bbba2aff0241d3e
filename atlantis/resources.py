"""Cluster resources and run times from the models: parameter counts, DeepSpeed memory, FLOPs and the cluster.

Every SLURM request of the workflow (GPUs, nodes, tasks, CPUs per task, memory per node, time limit) and every
line of `snakemake plan` comes from these functions, so the plan and the submissions cannot disagree:

- **Parameters** are counted, not typed: a local checkpoint's `config.json`, or the architecture fields the config
  declares for a Hub id (`model_sizes:`), is instantiated on PyTorch's meta device (no memory, no weights) and its
  parameters are summed; the largest single tensor (an embedding or LM head) is what ZeRO-3 gathers at once.
- **Training memory** is DeepSpeed's own estimate of the ZeRO-3 model states
  (`deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`, reproduced in `zero3_model_states` and
  pinned to it by a test) plus an activation estimate per GPU (Korthikanti et al. 2022, 34·s·b·h bytes per layer
  in 16-bit without recomputation) and a fixed host overhead per rank (CUDA context, pinned buffers, Python).
- **Time** is FLOPs over achieved FLOP/s: 6·N·tokens to train, 2·N·tokens to score or evaluate a log-likelihood,
  2·N per generated token, each at an assumed model-FLOPs utilisation (MFU) from the config's `cluster:` section;
  the SLURM limit is that estimate times a margin, and grows with each retry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path

GB = 1024**3
ZERO_MODES = ("zero3_offload", "zero3", "none")


class ResourceError(ValueError):
    """A job cannot be sized: an unknown model size, or a model that does not fit the cluster as configured."""


@dataclass(frozen=True)
class Cluster:
    """The configured cluster (config `cluster:`); the defaults are Table 6's A800 nodes."""

    gpu: str = "A800-80GB"  # name only, for the plan
    gpu_mem_gb: float = 80.0  # memory of one GPU
    peak_tflops: float = 312.0  # dense 16-bit peak of one GPU (A800/A100: 312); of one node when gpus_per_node = 0
    gpus_per_node: int = 8  # 0: a CPU cluster (the smoke and tiny profiles)
    cpus_per_node: int = 64
    ram_per_node_gb: float = 1024.0
    nodes: int = 8  # nodes this replication may use at once (wall-clock of the plan)
    mfu_train: float = 0.35  # achieved / peak FLOP/s, training without offload
    mfu_train_offload: float = 0.2  # with ZeRO-3 optimizer and parameter offload (PCIe traffic, CPU Adam)
    mfu_forward: float = 0.4  # scoring and log-likelihood evaluation (batched forward passes)
    mfu_generate: float = 0.05  # autoregressive decoding (memory-bound)
    # ZeRO-3 gathers every parameter in the forward and again in the backward pass and reduce-scatters the gradients:
    # 3 x 2 bytes x parameters cross the interconnect per micro-batch (Rajbhandari et al. 2020, ZeRO, section 7),
    # whatever the micro-batch size. At Table 6's micro-batches of 1-2 samples this, not compute, sets the pace.
    net_gb_s: float = 20.0  # collective bus bandwidth per GPU across nodes (NCCL busbw, GB/s): 200 Gb/s IB per GPU
    nvlink_gb_s: float = 150.0  # the same within one node
    host_gb_per_rank: float = 12.0  # host RAM per process beyond the model states: CUDA context, buffers, Python
    time_margin: float = 1.5  # SLURM time limit = estimate x margin x attempt
    min_minutes: int = 20  # shortest time limit asked for
    max_hours: float = 0  # the partition's limit (0: none); a job estimated beyond it is an error, not a timeout

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value < 0:
                raise ResourceError(f"cluster.{f.name} must be >= 0, got {value}")
        positive = ("peak_tflops", "mfu_train", "mfu_train_offload", "mfu_forward", "mfu_generate", "ram_per_node_gb")
        for name in (*positive, "net_gb_s", "nvlink_gb_s"):
            if getattr(self, name) <= 0:
                raise ResourceError(f"cluster.{name} must be > 0")
        if self.gpus_per_node and self.gpu_mem_gb <= 0:
            raise ResourceError("cluster.gpu_mem_gb must be > 0 on a GPU cluster")

    @classmethod
    def from_config(cls, section: Mapping | None) -> Cluster:
        section = dict(section or {})
        unknown = set(section) - {f.name for f in fields(cls)}
        if unknown:
            raise ResourceError(f"cluster: unknown key(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**section)

    @property
    def cpu_only(self) -> bool:
        return self.gpus_per_node == 0

    def flops_per_s(self, devices: int, mfu: float) -> float:
        """Achieved FLOP/s of `devices` GPUs (or, on a CPU cluster, `devices` nodes)."""
        return max(devices, 1) * self.peak_tflops * 1e12 * mfu


# ------------------------------------------------------------------------------------------ model sizes


@dataclass(frozen=True)
class ModelSize:
    params: int  # distinct parameters (tied embeddings once)
    largest_layer: int  # the largest single tensor: what ZeRO-3 gathers at once (an embedding or LM head)
    layers: int
    hidden: int
    vocab: int

    def bytes(self, bytes_per_param: int = 2) -> int:
        return self.params * bytes_per_param


def _count_on_meta(config) -> ModelSize:
    """Parameters of a transformers config, built on the meta device: exact counts, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p for p in model.parameters()}.values()  # tied tensors once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelSize(
        params=sum(p.numel() for p in params),
        largest_layer=max(p.numel() for p in params),
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        vocab=int(text.vocab_size),
    )


def _cache_file() -> Path:
    return Path(os.environ.get("ATLANTIS_SIZE_CACHE", ".snakemake/atlantis-model-sizes.json"))


@cache
def _size_cached(key: str, source: str) -> ModelSize:
    """Sizes are cached on disk by the hash of the architecture they were counted from (a 72B meta model takes
    seconds to build, and Snakemake parses the workflow again in every cluster job)."""
    path = _cache_file()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache:
        return ModelSize(**cache[key])
    from transformers import AutoConfig

    arch = json.loads(source)
    config = AutoConfig.for_model(**arch)
    size = _count_on_meta(config)
    cache[key] = asdict(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)
    return size


def model_size(spec: str, declared: Mapping[str, Mapping] | None = None) -> ModelSize:
    """The size of a model: a local checkpoint's config.json, or the architecture declared for a Hub id.

    `declared` maps a model id to its config.json fields (at least `model_type` and what differs from the
    architecture's defaults); they are what the Hub's config.json says, written into the config so that planning
    needs no network.
    """
    path = Path(spec) / "config.json"
    if path.is_file():
        arch = json.loads(path.read_text())
        arch.pop("architectures", None)
        arch = {k: v for k, v in arch.items() if not k.startswith("_") and k not in ("quantization_config",)}
    elif declared and spec in declared:
        arch = dict(declared[spec])
    elif declared is not None and Path(spec).exists():
        raise ResourceError(f"model {spec!r}: folder without config.json")
    else:
        raise ResourceError(
            f"model {spec!r}: no local config.json and no architecture declared under `model_sizes:` in the config "
            "(copy the Hub's config.json fields there: model_type, hidden_size, num_hidden_layers, ...)"
        )
    if "model_type" not in arch:
        raise ResourceError(f"model {spec!r}: its architecture has no model_type")
    source = json.dumps(arch, sort_keys=True)
    return _size_cached("v2-" + hashlib.sha256(source.encode()).hexdigest()[:16], source)


# ------------------------------------------------------------------------------------------ memory


def zero3_model_states(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    cpu_offload_params: bool = True,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int, int]:
    """DeepSpeed's `estimate_zero3_model_states_mem_needs` (0.19.8), verbatim in substance: (host bytes per node,
    bytes per GPU, largest layer bytes). A test pins it to DeepSpeed's function; it is reproduced so that a plan
    does not need DeepSpeed installed (the cluster's submit host may not have it)."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            per = 18 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 18 * gpus_factor)
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            per = 16 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 16 * gpus_factor)
        cpu_mem = total_params * per * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


def activation_bytes(size: ModelSize, tokens_per_gpu: int) -> int:
    """Activations of one micro-batch in 16-bit without recomputation: 34·s·b·h bytes per layer (Korthikanti et
    al. 2022, "Reducing Activation Recomputation", with fused attention: no s² term)."""
    return 34 * tokens_per_gpu * size.hidden * size.layers


@dataclass(frozen=True)
class JobResources:
    """What one job asks the scheduler for, and why."""

    gpus: int
    nodes: int
    tasks: int
    cpus_per_task: int
    mem_mb: int  # per node
    hours: float  # estimated run time (not the limit)
    gpu_gb: float = 0.0  # estimated peak memory per GPU
    note: str = ""

    def runtime_minutes(self, cluster: Cluster, attempt: int = 1) -> int:
        """The SLURM time limit: the estimate x margin, x attempt on a retry (a timed-out job gets more)."""
        return max(cluster.min_minutes, math.ceil(self.hours * 60 * cluster.time_margin * attempt))


def _check_time(what: str, hours: float, cluster: Cluster) -> None:
    if cluster.max_hours and hours * cluster.time_margin > cluster.max_hours:
        raise ResourceError(
            f"{what}: estimated {hours:.1f} h (x{cluster.time_margin} margin) exceeds the partition's "
            f"{cluster.max_hours} h (cluster.max_hours): checkpoints resume, but split the run or raise the limit"
        )


def train_resources(
    size: ModelSize,
    gpus: int,
    tokens: float,
    cluster: Cluster,
    zero: str = "zero3_offload",
    micro_batch_tokens: int = 4096,
    processes: int = 1,
    micro_steps: int = 0,
    what: str = "train",
) -> JobResources:
    """One training run of Table 6: `gpus` GPUs (one task each) across whole nodes, ZeRO-3 with or without offload.

    On a CPU cluster (`gpus_per_node: 0`) the run uses `processes` tasks on one node. `micro_steps`: micro-batch
    passes per GPU, each moving ZeRO-3's parameter gathers and gradient reduce-scatters (time: the larger of the
    compute and that traffic, as DeepSpeed overlaps them).
    """
    if zero not in ZERO_MODES:
        raise ResourceError(f"{what}: zero must be one of {ZERO_MODES}, got {zero!r}")
    offload = zero == "zero3_offload"
    if cluster.cpu_only:
        tasks, nodes, per_node = max(processes, 1), 1, max(processes, 1)
    else:
        if gpus < 1:
            raise ResourceError(f"{what}: a GPU cluster run needs gpus >= 1")
        tasks, per_node = gpus, min(gpus, cluster.gpus_per_node)
        nodes = math.ceil(gpus / cluster.gpus_per_node)
    if zero == "none":
        # DDP: every rank holds fp32 master weights, gradients and AdamW states (16 bytes/param) on its device
        host, device = size.params * 4 * per_node, 16 * size.params
    else:
        host, device, _ = zero3_model_states(
            size.params, size.largest_layer, per_node, nodes, cpu_offload=offload, cpu_offload_params=offload
        )
    act = activation_bytes(size, micro_batch_tokens)
    cpus = max(1, cluster.cpus_per_node // per_node)
    if cluster.cpu_only:
        host += device + act * tasks  # everything lives in host RAM
        gpu_gb = 0.0
    else:
        gpu_gb = (device + act) / GB
        if gpu_gb > cluster.gpu_mem_gb:
            raise ResourceError(
                f"{what}: ~{gpu_gb:.0f} GB per GPU ({zero}, {size.params / 1e9:.1f}B params, {gpus} GPUs) exceeds "
                f"{cluster.gpu_mem_gb} GB: use zero3_offload, more GPUs or gradient checkpointing"
            )
    mem = host + per_node * cluster.host_gb_per_rank * GB
    if mem > cluster.ram_per_node_gb * GB:
        raise ResourceError(
            f"{what}: ~{mem / GB:.0f} GB host RAM per node ({zero}) exceeds cluster.ram_per_node_gb "
            f"{cluster.ram_per_node_gb}: use more nodes or less offload"
        )
    mfu = cluster.mfu_train_offload if offload else cluster.mfu_train
    compute = 6 * size.params * tokens / cluster.flops_per_s(1 if cluster.cpu_only else gpus, mfu)
    comm = 0.0
    if zero != "none" and not cluster.cpu_only and gpus > 1:
        bandwidth = (cluster.net_gb_s if nodes > 1 else cluster.nvlink_gb_s) * 1e9
        comm = micro_steps * 3 * 2 * size.params * (gpus - 1) / gpus / bandwidth
    hours = max(compute, comm) / 3600
    _check_time(what, hours, cluster)
    return JobResources(
        gpus=0 if cluster.cpu_only else gpus,
        nodes=nodes,
        tasks=tasks,
        cpus_per_task=cpus,
        mem_mb=math.ceil(mem / 2**20),
        hours=hours,
        gpu_gb=gpu_gb,
        note=f"{zero}, {'communication' if comm > compute else 'compute'}-bound",
    )


def inference_gpus(sizes: list[ModelSize], cluster: Cluster, overhead: float = 1.25, logits_tokens: int = 0) -> int:
    """GPUs for one inference job holding `sizes` in 16-bit (the proxy triple holds three), sharded across a node:
    the smallest power of two whose memory holds the weights x `overhead` (KV cache, activations) plus the fp32
    logits of `logits_tokens` positions and their log-softmax (lm-eval's `hf` model scores whole batches: at
    Gemma-2's 256k vocabulary, 16 x 2,048 positions are 50 GB)."""
    if cluster.cpu_only:
        return 0
    need = sum(s.bytes(2) for s in sizes) * overhead / GB
    need += logits_tokens * max(s.vocab for s in sizes) * 8 / GB
    gpus = 1
    while gpus * cluster.gpu_mem_gb < need:
        gpus *= 2
    if gpus > cluster.gpus_per_node:
        raise ResourceError(
            f"{need:.0f} GB of weights do not fit the {cluster.gpus_per_node} x {cluster.gpu_mem_gb} GB GPUs of a node"
        )
    return gpus


def inference_resources(
    sizes: list[ModelSize],
    cluster: Cluster,
    forward_tokens: float = 0.0,
    generated_tokens: float = 0.0,
    gpus: int | None = None,
    logits_tokens: int = 0,
    threads: int = 0,
    what: str = "eval",
) -> JobResources:
    """A scoring, lm-eval or answer job: weights sharded over a node's GPUs (or `gpus` data-parallel tasks for
    scoring); 2·N FLOPs per token read and per token generated. On a CPU cluster the job asks for `threads` cores
    (the rule's torch threads; 0: the whole node), so jobs lighter than a node share it."""
    need = inference_gpus(sizes, cluster, logits_tokens=logits_tokens)
    n = sum(s.params for s in sizes)
    if cluster.cpu_only:
        devices, tasks = 0, 1
    else:
        devices = max(need, gpus or 0)
        tasks = 1
    # loading maps the safetensors shards straight to the GPUs (device_map): host RAM for one shard at a time,
    # but a CPU run (or a fallback) holds the whole model
    host = sum(s.bytes(4 if cluster.cpu_only else 2) for s in sizes) + cluster.host_gb_per_rank * GB
    # A model sharded with transformers' device_map runs its layers one GPU after the other (pipeline without
    # overlap): one GPU's throughput, however many hold it. Data-parallel scoring (`gpus`, one whole model per GPU)
    # uses them all. vLLM's tensor parallelism would too, but it is an optional backend: plan for the fallback.
    busy = devices if (need <= 1 and devices > 1) else min(devices, 1)
    seconds = 2 * n * forward_tokens / cluster.flops_per_s(busy, cluster.mfu_forward)
    seconds += 2 * n * generated_tokens / cluster.flops_per_s(busy, cluster.mfu_generate)
    hours = seconds / 3600
    _check_time(what, hours, cluster)
    return JobResources(
        gpus=devices,
        nodes=1,
        tasks=tasks,
        cpus_per_task=max(1, cluster.cpus_per_node // max(cluster.gpus_per_node, 1) * max(devices, 1))
        if not cluster.cpu_only
        else min(threads or cluster.cpus_per_node, cluster.cpus_per_node),
        mem_mb=math.ceil(min(host, cluster.ram_per_node_gb * GB) / 2**20),
        hours=hours,
        gpu_gb=sum(s.bytes(2) for s in sizes) / GB / max(devices, 1),
        note=f"{devices} GPU(s)" if devices else "CPU",
    )
