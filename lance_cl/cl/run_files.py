"""The files of one run: where they live, how they are written so that a fault never loses a
finished task, and how they are read back.

One run (benchmark, strategy, seed) owns ``<out>/<stem>.json`` (the results) and
``<out>/checkpoints/<stem>.pt`` (the state after the last finished task) with the previous good
checkpoint beside it as ``<stem>.pt.prev``. Every write goes to a temporary file that is
fsynced before it is renamed over the old one (then the folder is fsynced), so a power cut or a
full disk leaves either the old file or the new one, never half of one. A file that is
nevertheless unreadable (a copy cut short, a disk error) is moved aside to ``*.corrupt`` with a
warning naming it, and the run continues from the newest readable state: the previous
checkpoint, whose results hold every task but the last; a damaged JSON is rebuilt from the
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

# torch is imported where a checkpoint is read or written: a sweep's driver writes run JSONs
# and tables only, and does not import it (docs/sweeps.md)

__all__ = [
    "RESULT_FORMAT",
    "RunFileError",
    "RunFileWarning",
    "checkpoint_path",
    "json_safe",
    "load_checkpoint",
    "previous_checkpoint_path",
    "read_result",
    "remove_checkpoints",
    "result_path",
    "run_stem",
    "save_checkpoint",
    "write_json_atomic",
    "write_text_atomic",
]

RESULT_FORMAT = "lance-cl-run/1"
# config keys that must match for a saved run / checkpoint to be reused
MATCH_KEYS = ("benchmark", "strategy", "seed", "epochs", "quick")
# what torch.load raises on a truncated or otherwise damaged file
_UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


class RunFileError(RuntimeError):
    """A run's files cannot be resumed from and starting over would discard finished tasks."""


class RunFileWarning(UserWarning):
    """A run file was unreadable and was moved aside; the run continues from an older state."""


def run_stem(benchmark: str, strategy: str, seed: int) -> str:
    """File stem of one run: ``<benchmark>__<strategy>__seed<k>``."""
    return f"{benchmark}__{strategy}__seed{seed}"


def result_path(out_dir: Union[str, Path], benchmark: str, strategy: str, seed: int) -> Path:
    """Where :func:`~lance_cl.cl.runner.run_experiment` writes the results JSON."""
    return Path(out_dir) / f"{run_stem(benchmark, strategy, seed)}.json"


def checkpoint_path(out_dir: Union[str, Path], benchmark: str, strategy: str, seed: int) -> Path:
    """Where :func:`~lance_cl.cl.runner.run_experiment` writes the checkpoint of the last
    finished task."""
    return Path(out_dir) / "checkpoints" / f"{run_stem(benchmark, strategy, seed)}.pt"


def previous_checkpoint_path(checkpoint: Path) -> Path:
    """The previous good checkpoint kept beside ``checkpoint`` (``<name>.prev``)."""
    return checkpoint.with_name(checkpoint.name + ".prev")


def configs_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two run configs agree on what decides the results (:data:`MATCH_KEYS`)."""
    return all(a.get(k) == b.get(k) for k in MATCH_KEYS)


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: numpy / torch scalars and tensors to Python, non-finite floats to None,
    paths and str subclasses to plain strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    torch = sys.modules.get("torch")   # a tensor exists only once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (Path, str)):   # str subclasses too (torch.__version__ is a TorchVersion)
        return str(obj)
    return obj


# -- writing ---------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _write_durably(path: Path, write: Any) -> Path:
    """``write(binary file)`` into a temporary file beside ``path``, fsynced; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``: all of it or, after a fault, the old file."""
    tmp = _write_durably(path, lambda f: f.write(text.encode("utf-8")))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``json_safe(data)`` to ``path``: all of it or, after a fault, the old file."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    """``torch.save(data)`` to ``path``; the checkpoint it replaces becomes ``<path>.prev``.

    The new file is complete and fsynced before anything is renamed, and ``path`` always names
    a complete checkpoint (the old one is linked, or copied, to ``.prev`` before the new one
    takes its name). A ``.prev`` without a checkpoint beside it is from an earlier run: removed."""
    import torch

    tmp = _write_durably(path, lambda f: torch.save(data, f))
    previous = previous_checkpoint_path(path)
    if path.exists():
        staged = _temporary(previous)
        try:
            os.link(path, staged)
        except OSError:   # no hard links on this file system
            shutil.copyfile(path, staged)
        os.replace(staged, previous)
    else:
        previous.unlink(missing_ok=True)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_checkpoints(path: Path) -> None:
    """Delete the checkpoint ``path`` and the previous one beside it (a run started over)."""
    for candidate in (path, previous_checkpoint_path(path)):
        candidate.unlink(missing_ok=True)


# -- reading ---------------------------------------------------------------------------------------


def _move_aside(path: Path, error: str, what: str, then: str) -> None:
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    warnings.warn(f"{what} {path} is unreadable ({error}); moved to {aside}; {then}",
                  RunFileWarning, stacklevel=3)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def read_result(path: Path) -> Optional[dict[str, Any]]:
    """The results JSON at ``path``, or None when there is none. An unreadable file (truncated,
    not JSON) is moved aside to ``<path>.corrupt`` with a :class:`RunFileWarning`; the finished
    tasks are then taken from the run's checkpoint."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return data
    except (OSError, ValueError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _move_aside(path, _describe(exc), "run file",
                    "the finished tasks are taken from the run's checkpoint (trained again without one)")
        return None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    data = torch.load(path, map_location="cpu", weights_only=False)
    missing = {"config", "completed_tasks", "model", "results"} - set(data if isinstance(data, dict) else ())
    if missing:
        raise ValueError(f"not a lance-cl checkpoint: missing {', '.join(sorted(missing))}")
    return data


def load_checkpoint(path: Path, config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The newest readable checkpoint of the run with ``config``, or None (start from task 0).

    Reads ``path``; when it exists but is unreadable (truncated, damaged), reads the previous
    checkpoint ``<path>.prev`` instead, moves the damaged file aside to ``*.corrupt`` with a
    :class:`RunFileWarning` naming both, and renames the previous checkpoint to ``path``. No ``path`` means no checkpoint, and a readable
    checkpoint of another config (other epochs, quick or not) is not used: None. Raises
    :class:`RunFileError`, touching nothing, when neither file can be read: starting over
    would rewrite the finished tasks."""
    if not path.is_file():
        return None
    damaged: list[tuple[Path, str]] = []
    for candidate in (path, previous_checkpoint_path(path)):
        if not candidate.is_file():
            continue
        try:
            data = _read_checkpoint(candidate)
        except _UNREADABLE as exc:
            damaged.append((candidate, _describe(exc)))
            continue
        if not configs_match(data.get("config", {}), config):
            return None
        for bad, error in damaged:
            _move_aside(bad, error, "checkpoint",
                        f"resuming from {candidate} (after task {data['completed_tasks']}); the "
                        f"tasks after it are trained again")
        if candidate != path:   # the previous checkpoint is the newest good one again
            os.replace(candidate, path)
            _fsync_dir(path.parent)
        return data
    listing = "; ".join(f"{bad} ({error})" for bad, error in damaged)
    raise RunFileError(
        f"no readable checkpoint for run {path.stem}: {listing}. Its finished tasks cannot be "
        f"resumed; restore a good copy of {path}, or delete the damaged file(s) to train the "
        f"run from the start")
