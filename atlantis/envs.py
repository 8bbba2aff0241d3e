"""Per-rule software environments without conda: a pip virtual environment built once from a conda YAML.

A benchmark whose package conflicts with the main environment (fschat's judge needs `openai<1`, alpaca-eval
`openai>=1.5`, `pandas<3`) gets its own `workflow/envs/<name>.yaml`. With conda, Snakemake builds it
(`--software-deployment-method conda`). Without conda, `atlantis env` reads the same YAML's `pip:` list
and builds `.envs/<name>/` with `venv` + pip, once: a later call finds the recorded requirements unchanged and
reuses it; a changed YAML rebuilds it. The rules then call `.envs/<name>/bin/python`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import yaml

from atlantis.config import field
from atlantis.log import get_logger

log = get_logger(__name__)

STAMP = "atlantis-env.json"


class EnvError(ValueError):
    pass


@dataclass
class EnvConfig:
    spec: str = field(help="The environment's conda YAML (workflow/envs/<name>.yaml); its `pip:` list is used.")
    out: str = field(help="Folder of the virtual environment (e.g. .envs/<name>).")
    python: str = field(sys.executable, help="Interpreter the environment is made from.")


def pip_requirements(spec: str | Path) -> list[str]:
    """The `pip:` requirements of a conda environment file, relative paths resolved against its folder."""
    path = Path(spec)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise EnvError(f"{path}: no such environment file") from None
    deps = (doc or {}).get("dependencies") or []
    pips = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    if not pips:
        raise EnvError(f"{path}: no `pip:` list under `dependencies` (nothing to install without conda)")
    reqs = []
    for req in pips[0]:
        req = str(req)
        for prefix in ("-e ", ""):
            target = req[len(prefix) :]
            if req.startswith(prefix) and target.startswith(("./", "../")):
                name, _, extras = target.partition("[")
                req = prefix + str((path.parent / name).resolve()) + (f"[{extras}" if extras else "")
                break
        reqs.append(req)
    return reqs


def build(cfg: EnvConfig) -> Path:
    """`atlantis env`: create or reuse the virtual environment; returns its python."""
    reqs = pip_requirements(cfg.spec)
    out = Path(cfg.out)
    digest = hashlib.sha256(json.dumps(reqs).encode()).hexdigest()
    python = out / "bin" / "python"
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == digest and python.is_file():
        log.info("%s is up to date (%d requirements); reused", out, len(reqs))
        return python
    if out.exists():
        log.info("%s was built from other requirements; rebuilding", out)
        shutil.rmtree(out)
    log.info("building %s from %s", out, cfg.spec)
    try:
        if cfg.python == sys.executable:
            venv.EnvBuilder(with_pip=True).create(out)
        else:
            subprocess.run([cfg.python, "-m", "venv", str(out)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *reqs], check=True)
    except subprocess.CalledProcessError as err:
        # no stamp is written, so the next call starts again from scratch
        raise EnvError(f"building {out} from {cfg.spec} failed: {err}") from None
    stamp.write_text(json.dumps({"spec": str(cfg.spec), "requirements": reqs, "sha256": digest}, indent=1) + "\n")
    return python
