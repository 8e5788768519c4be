"""Checkpoints on Google Drive (Colab's DriveFS mount): each one flushed when written; pruned ones deleted for
good through the Drive API when it was granted, else moved to Drive's trash with a warning saying so."""

import warnings

import pytest

from grpo_lib import checkpoint

MOUNTS = "\n".join([
    "overlay / overlay rw,relatime 0 0",
    "drive /content/drive fuse.drive rw,nosuid,nodev,relatime 0 0",
    "/dev/sdb1 /content/drive/MyDrive/local ext4 rw 0 0",
    r"drive /mnt/my\040drive fuse.drive rw 0 0",
])


@pytest.mark.parametrize("path, expected", [
    ("/content/drive/MyDrive/grpo-workbench/runs/r1", True),
    ("/content/drive", True),
    ("/content/runs/r1", False),
    ("/content/drivex/runs", False),  # a sibling whose name starts like the mount point
    ("/content/drive/MyDrive/local/runs", False),  # the longest mount point decides: ext4
    ("/mnt/my drive/runs", True),  # /proc/mounts writes the space as \040
])
def test_on_google_drive_reads_the_file_system_of_the_longest_mount_point(path, expected):
    assert checkpoint.on_google_drive(path, MOUNTS) is expected


def write_files(folder):
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 10)
    (folder / "trainer_state.pt").write_bytes(b"s" * 5)


def test_a_checkpoint_is_flushed_files_and_folders_then_the_rename(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda d: synced.append(d.relative_to(tmp_path).as_posix()))
    final = checkpoint.save_checkpoint(tmp_path, 3, write_files, keep=2)
    tmp = f"checkpoints/.tmp-step-000003-{__import__('os').getpid()}"
    # the written folder's subfolders and itself before the rename, then the folder holding the rename
    assert synced == [f"{tmp}/adapter", tmp, "checkpoints"]
    assert final == tmp_path / "checkpoints" / "step-000003" and (final / "MANIFEST.json").is_file()


class FakeDriveFiles:
    """The Drive API's files() resource: records what was deleted (for good)."""

    def __init__(self):
        self.deleted = []

    def delete(self, fileId):
        self.deleted.append(fileId)
        return self

    def execute(self):
        return ""


def on_fake_drive(monkeypatch, files):
    monkeypatch.setattr(checkpoint, "on_google_drive", lambda path, mounts=None: True)
    monkeypatch.setattr(checkpoint, "drive_file_id", lambda path: f"id-of-{path.name}")
    monkeypatch.setattr(checkpoint, "_drive_files", files)
    monkeypatch.setattr(checkpoint, "_warned_trash", False)


def test_pruned_checkpoints_on_drive_are_deleted_for_good_through_the_api(tmp_path, monkeypatch):
    files = FakeDriveFiles()
    on_fake_drive(monkeypatch, files)
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, write_files, keep=2)
    assert files.deleted == ["id-of-step-000001"]
    assert [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000003"]


def test_without_the_api_a_pruned_checkpoint_goes_to_the_trash_with_one_warning(tmp_path, monkeypatch):
    on_fake_drive(monkeypatch, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3, 4):
            checkpoint.save_checkpoint(tmp_path, step, write_files, keep=2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # once, not at every prune
    assert "step-000001 goes to Google Drive's trash" in messages[0]
    assert "grpo_lib.checkpoint.enable_drive_deletion()" in messages[0]
    assert [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000003", "step-000004"]


def test_off_drive_nothing_asks_the_api(tmp_path, monkeypatch):
    files = FakeDriveFiles()
    monkeypatch.setattr(checkpoint, "_drive_files", files)
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, write_files, keep=1)
    assert files.deleted == [] and [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000002"]


def test_enable_drive_deletion_outside_colab_says_why_and_keeps_the_trash(monkeypatch):
    monkeypatch.setattr(checkpoint, "_drive_files", None)
    with pytest.warns(UserWarning, match="pruned checkpoints on Google Drive will go to its trash"):
        assert checkpoint.enable_drive_deletion() is False
    assert checkpoint._drive_files is None
