"""Multi-process and multi-node launch under SLURM: one task per GPU started by `srun`, no torchrun.

The training rule of a preset with more than one process (paper Table 6: 16, 32 or 64 GPUs on 2, 4 or 8 nodes)
asks the SLURM executor for `--nodes`, `--gpus` and one task per GPU, and runs `srun_prefix(n) atlantis train ...`
inside the allocation. Each task then finds SLURM's variables, which `torch_env_from_slurm` turns into the ones
torch.distributed, DeepSpeed and the HF Trainer read (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); the
rendezvous host and port are exported by the prefix from the allocation's first node and the job id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping


def srun_prefix(tasks: int, nodes: int = 1, gpus: int = 0, cpus_per_task: int = 1) -> str:
    """Shell words that start `tasks` copies of the following command across the allocation ('' for one).

    Snakemake's SLURM job step strips every SLURM_* variable but the job id before running a rule's shell, so the
    node list is asked from squeue, and the step's geometry is given in full: tasks, nodes, one GPU per task, and
    the CPUs of each task (without `--cpus-per-task` every rank is pinned to one core, and the offloaded optimizer
    step, DeepSpeed's CPU Adam, runs on that one core).
    """
    if tasks < 1 or nodes < 1 or gpus < 0 or cpus_per_task < 1:
        raise ValueError(
            f"need tasks >= 1, nodes >= 1, gpus >= 0, cpus_per_task >= 1; got {tasks}, {nodes}, {gpus}, {cpus_per_task}"
        )
    if tasks == 1:
        return ""
    if gpus and gpus != tasks:
        raise ValueError(f"one task per GPU: {tasks} tasks for {gpus} GPUs")
    first_node = 'scontrol show hostnames "${SLURM_JOB_NODELIST:-$(squeue -h -j "$SLURM_JOB_ID" -o %N)}" | head -n 1'
    return (
        f'export MASTER_ADDR="$({first_node})" MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); '
        f"srun --kill-on-bad-exit=1 --nodes={nodes} --ntasks={tasks} --cpus-per-task={cpus_per_task} "
        + ("--gpus-per-task=1 " if gpus else "")
    )


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables for one task of a multi-task `srun` step; {} when not in one.

    A launcher that already set RANK (torchrun, deepspeed, accelerate) wins. With one visible GPU per task (SLURM's
    `--ntasks-per-gpu=1` binds each task to its GPU), LOCAL_RANK is 0: the task's only device.
    """
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: the batch script itself has SLURM_NTASKS = the allocation's tasks
    # and SLURM_PROCID = 0, but it is one process; only an `srun` step's tasks are the ranks.
    if "RANK" in environ or "SLURM_PROCID" not in environ or int(environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return {}
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise RuntimeError(
            f"a multi-task SLURM step needs {missing} (the workflow's train rule exports them: atlantis.launch)"
        )
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    local_rank = "0" if len(visible) == 1 else environ.get("SLURM_LOCALID", "0")
    out = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": local_rank,
        "NODE_RANK": environ.get("SLURM_NODEID", "0"),
    }
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0]  # "8(x2)": 8 tasks on each of 2 nodes
    if per_node.isdigit():
        out["LOCAL_WORLD_SIZE"] = "1" if len(visible) == 1 else per_node
    return out


def adopt_slurm_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set torch.distributed's variables from SLURM's (see `torch_env_from_slurm`); returns what was set."""
    env = torch_env_from_slurm(environ)
    environ.update(env)
    return env
