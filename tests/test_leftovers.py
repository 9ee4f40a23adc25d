"""What a killed process leaves is removed; what a live one owns is not (weights.owned_folders, the
LoRA cache's partial downloads). The owners here are real processes, killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from test_versions import ROOT

from weights.lora_cache import LoraCache
from weights.owned_folders import OwnedFolder, is_abandoned, remove_abandoned

OWN_A_FOLDER = """
import sys
from pathlib import Path
from weights.owned_folders import OwnedFolder
folder = OwnedFolder(sys.argv[1], parent=Path(sys.argv[2]))
(folder.path / "images").mkdir()
(folder.path / "images" / "0.png").write_bytes(b"x" * 1000)
print(folder.path, flush=True)
sys.stdin.read()  # hold it until told (or killed)
"""

PRODUCE_A_DOWNLOAD = """
import sys, tempfile
from pathlib import Path
from weights.lora_cache import LoraCache
cache = LoraCache(Path(sys.argv[1]), 10**9)
key = LoraCache.key_for("url:https://example.com/big.safetensors")
fd = cache._acquire(key, blocking=True)  # as get_or_create holds it while producing
work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache.root))
(work / "download").write_bytes(b"x" * 5000)
print(work, flush=True)
sys.stdin.read()
"""


def start(script: str, *args: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, Path(process.stdout.readline().strip())


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_a_killed_owners_folder_is_removed_and_a_live_ones_kept(tmp_path):
    dead, dead_folder = start(OWN_A_FOLDER, "lora-train-", str(tmp_path))
    live, live_folder = start(OWN_A_FOLDER, "lora-train-", str(tmp_path))
    try:
        kill(dead)
        mine = OwnedFolder("lora-train-", parent=tmp_path)  # this process's own, in use
        assert not is_abandoned(mine.path)
        assert remove_abandoned("lora-train-", tmp_path) == [dead_folder]
        assert not dead_folder.exists() and live_folder.exists() and mine.path.exists()
        (mine.path / "x").write_text("x")
        assert mine.empty() == mine.path and [p.name for p in mine.path.iterdir()] == [".owner"]
        mine.release()
        assert not mine.path.exists()
    finally:
        kill(live)
    assert remove_abandoned("lora-train-", tmp_path) == [live_folder]


def test_a_killed_downloads_partial_file_counts_until_removed(tmp_path):
    cache = LoraCache(tmp_path / "cache", 10**9)
    producer, work = start(PRODUCE_A_DOWNLOAD, str(cache.root))
    assert cache.total_bytes() == 5000  # partial downloads count against the budget
    assert cache.remove_abandoned() == []  # its producer is alive: kept
    kill(producer)
    assert cache.remove_abandoned() == [work]
    assert cache.total_bytes() == 0
    assert list((cache.root / "locks").iterdir()) == []  # no lock file is left behind either


def test_lock_files_exist_only_while_held(tmp_path):
    cache = LoraCache(tmp_path / "cache", 10**9)

    def produce(workdir: Path) -> Path:
        assert len(list((cache.root / "locks").iterdir())) == 1  # held while producing
        raise ValueError("the download failed")

    try:
        cache.get_or_create("url:https://example.com/a", produce)
    except ValueError:
        pass
    assert list((cache.root / "locks").iterdir()) == []

    def produce_one(workdir: Path) -> Path:
        (workdir / "f").write_bytes(b"1")
        return workdir / "f"

    made = cache.get_or_create("url:https://example.com/b", produce_one)
    assert made.read_bytes() == b"1" and list((cache.root / "locks").iterdir()) == []
