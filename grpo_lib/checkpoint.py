"""Checkpoints of a run directory: what a trainer saves and restores, and how it reaches the disk.

    checkpoints/step-000010/   adapter/ (peft format) + trainer_state.pt + MANIFEST.json (file sizes)

trainer_state.pt holds the step, the data position, every random stream (rng.rng_state), the stop counters,
AdamW's, the scheduler's and the GradScaler's states, the config, and (full fine-tuning) the trainable
weights. A checkpoint is written into a temp folder, fsynced and renamed into place, so a crash leaves the last
good one untouched; on load, one whose files do not match its manifest or do not load is skipped with a
warning. Pruned checkpoints on Google Drive are deleted for good through the Drive API when it was granted
(enable_drive_deletion), else they go to Drive's trash, with a warning.

Resume (resume_trainer): the newest good checkpoint's state is applied, and the run log's lines after it move
to log.dropped.jsonl (runlog.truncate_log_after): those steps are redone, and with the checkpoint's random
streams they equal an uninterrupted run's. The trainer decides when to write (GRPOTrainer.train).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from . import runlog
from .models import is_peft
from .rng import rng_state, set_rng_state
from .runlog import RunDirError

CKPT_DIR = "checkpoints"
STATE_NAME = "trainer_state.pt"


# ----------------------------------------------------------------------------------------------
# a trainer's state: saved, read back, applied
# ----------------------------------------------------------------------------------------------


def trainer_state(trainer) -> dict:
    """What trainer_state.pt holds (GRPOTrainer.state_dict): everything but the LoRA adapter, which is saved in
    peft's format beside it."""
    return {"step": trainer.step_count, "data_position": trainer.data_position, "rng": rng_state(),
            "saturated_steps": trainer.saturated_steps, "skipped_steps": trainer.skipped_steps,
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(), "config": trainer.config.to_dict(),
            "trainable": None if is_peft(trainer.model) else
            {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}}


def save_trainer(trainer) -> Path:
    """checkpoints/step-N of trainer.run_dir: the adapter (peft format) + trainer_state.pt; pruned to
    config.save_total_limit. Returns the checkpoint's folder."""
    if trainer.run_dir is None:
        raise RunDirError("save_checkpoint needs a run_dir")

    def write(folder: Path):
        if is_peft(trainer.model):
            trainer.model.save_pretrained(folder / "adapter")
        torch.save(trainer_state(trainer), folder / STATE_NAME)

    return save_checkpoint(trainer.run_dir, trainer.step_count, write, trainer.config.save_total_limit)


def read_checkpoint(folder: Path, model) -> dict:
    """The state of checkpoint `folder`, with the adapter's tensors under "adapter" for a peft model."""
    state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False)
    if is_peft(model):
        from safetensors.torch import load_file

        files = list((folder / "adapter").glob("adapter_model.safetensors"))
        if not files:
            raise RunDirError(f"{folder}/adapter has no adapter_model.safetensors")
        state["adapter"] = load_file(files[0])
    return state


def apply_trainer_state(trainer, state: dict) -> None:
    """Put a checkpoint's state into the trainer: weights, optimiser, scheduler, scaler, counters, and the random
    streams, which the next step continues (it does not seed: trainer.rng_started)."""
    if is_peft(trainer.model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, state["adapter"])
    else:
        named = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step_count, trainer.data_position = state["step"], state["data_position"]
    trainer.saturated_steps = state.get("saturated_steps", 0)
    trainer.skipped_steps = state.get("skipped_steps", 0)
    set_rng_state(state["rng"])
    trainer.rng_started = True


def resume_trainer(trainer) -> int:
    """Apply the newest good checkpoint of trainer.run_dir and move the log lines after it to
    log.dropped.jsonl (with a warning). Returns the step resumed from (0 without a checkpoint)."""
    found = latest_good_checkpoint(trainer.run_dir, lambda folder: read_checkpoint(folder, trainer.model))
    step = 0
    if found is not None:
        apply_trainer_state(trainer, found[1])
        step = trainer.step_count
    moved = runlog.truncate_log_after(trainer.run_dir, step)
    if moved:
        warnings.warn(f"{moved} run-log line(s) after step {step} moved to {runlog.DROPPED_NAME}; "
                      f"those steps are redone", stacklevel=3)
    return step


# ----------------------------------------------------------------------------------------------
# checkpoint folders: written to a temp dir, renamed into place, validated on load
# ----------------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first (temp dirs of interrupted writes are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.exists():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def save_checkpoint(run_dir: str | os.PathLike, step: int, write_fn, keep: int) -> Path:
    """Write checkpoint `step` atomically: write_fn(tmp_dir) fills a temp dir, which is fsynced and
    renamed to checkpoints/step-NNNNNN. A crash mid-write leaves only a temp dir; the last good
    checkpoint is untouched. Then prune to the `keep` newest."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_fn(tmp)
    _write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): swap, never half-overwrite
        old = root / f".old-step-{step:06d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        remove_tree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)  # the rename itself is durable (on Google Drive: handed to its uploader)
    for stale in [d for d in root.iterdir() if d.name.startswith((".tmp-", ".old-"))]:
        remove_tree(stale)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_tree(old)
    return final


def latest_good_checkpoint(run_dir: str | os.PathLike, load_fn) -> tuple[Path, object] | None:
    """Newest checkpoint whose files match their manifest and that load_fn(dir) can load.
    Damaged ones are reported with a warning and skipped. Returns (dir, load_fn result) or None."""
    for d in reversed(checkpoint_dirs(run_dir)):
        problem = _check_manifest(d)
        if problem is None:
            try:
                return d, load_fn(d)
            except Exception as e:  # any load failure means: damaged, try the previous one
                problem = f"{type(e).__name__}: {e}"
        warnings.warn(f"checkpoint {d} is damaged ({problem}); falling back to the previous one", stacklevel=2)
    return None


def _write_manifest(d: Path) -> None:
    sizes = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}
    (d / "MANIFEST.json").write_text(json.dumps(sizes, indent=1))


def _check_manifest(d: Path) -> str | None:
    path = d / "MANIFEST.json"
    try:
        sizes = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"missing or unreadable MANIFEST.json ({e})"
    for name, size in sizes.items():
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def _fsync_tree(d: Path) -> None:
    """fsync every file under d, then every folder (their entries), deepest first."""
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for folder in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some FUSE file systems do not implement fsync on a folder; the files are synced
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Google Drive (Colab's drive.mount): a file removed through the mount goes to Drive's trash, where it counts
# against the quota for 30 days; pruned checkpoints are deleted for good through the Drive API instead
# ----------------------------------------------------------------------------------------------

DRIVE_FS_TYPE = "fuse.drive"  # Colab's DriveFS mount, as /proc/mounts lists it
_drive_files = None  # the Drive API's files() resource, once enable_drive_deletion() has been granted access
_warned_trash = False


def on_google_drive(path: str | os.PathLike, mounts: str | None = None) -> bool:
    """Whether `path` lies on a Google Drive mount: the file system of its longest mount point in /proc/mounts
    (or the text `mounts`) is DriveFS."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
    target = os.path.abspath(path)
    best, fs_type = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # a space is \040 there
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, fs_type = point, parts[2]
    return fs_type == DRIVE_FS_TYPE


def drive_file_id(path: str | os.PathLike) -> str:
    """The Drive id of a file or folder on Colab's Drive mount (DriveFS exposes it as an extended attribute)."""
    return os.getxattr(path, "user.drive.id").decode().strip()


def enable_drive_deletion() -> bool:
    """Colab only: let checkpoint pruning delete old checkpoints on Google Drive for good (Drive API
    files.delete, which skips the trash) instead of moving them to Drive's trash. Asks once for access to your
    Drive (google.colab.auth). Returns whether it is enabled; if not, pruned checkpoints go to the trash."""
    global _drive_files
    try:
        from google.colab import auth
        from googleapiclient.discovery import build

        auth.authenticate_user()
        _drive_files = build("drive", "v3", cache_discovery=False).files()
    except Exception as e:  # noqa: BLE001 - declined, not in Colab, no client: pruning falls back to the trash
        warnings.warn(f"pruned checkpoints on Google Drive will go to its trash (Drive API unavailable: {e})",
                      stacklevel=2)
        return False
    return True


def remove_tree(folder: str | os.PathLike) -> None:
    """Delete a folder. On Google Drive: for good through the Drive API when enable_drive_deletion() granted
    access, else (into the trash) with a warning, once, on how to empty it."""
    global _warned_trash
    folder = Path(folder)
    if on_google_drive(folder):
        if _drive_files is not None:
            try:
                _drive_files.delete(fileId=drive_file_id(folder)).execute()  # a folder: with its contents
            except Exception as e:  # noqa: BLE001 - deleting through the mount (to the trash) still works
                warnings.warn(f"could not delete {folder} for good through the Drive API ({e}): it goes to Drive's "
                              f"trash", stacklevel=3)
        elif not _warned_trash:
            _warned_trash = True
            warnings.warn(f"{folder} goes to Google Drive's trash, where pruned checkpoints count against your quota "
                          f"for 30 days: empty the trash at drive.google.com, or call "
                          f"grpo_lib.checkpoint.enable_drive_deletion() once to delete them for good", stacklevel=3)
    shutil.rmtree(folder, ignore_errors=True)  # after an API deletion: whatever the mount still shows
