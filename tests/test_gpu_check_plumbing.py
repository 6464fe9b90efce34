"""bench/gpu_check.sh hands back what the device tool can carry off the GPU machine: at most 8 files in OUTDIR,
among them SUMMARY.md and one tarball of everything else, and the commit it measured when the copied tree has no
.git. CI runs the whole check twice on the CPU (.ci/run), and the script fails there itself when OUTDIR holds more
than 8 files; this test gives it no time for any stage, so it costs one torch import."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")


def test_a_copy_without_git_reports_bench_git_commit_and_hands_back_few_files(tmp_path):
    # The copy sits inside another repository, whose commit git would report if asked from the copy.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "outer"], check=True)
    tree = tmp_path / "copy"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(REPO / "bench" / "gpu_check.sh", tree / "bench")
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DEVICE="cpu", GPU_CHECK_TOTAL_S="0",
               BENCH_GIT_COMMIT="abc1234", TMPDIR=str(scratch))
    result = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh"), str(out)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and "SUMMARY.md" in files and "gpu-check.tar.gz" in files, files
    summary = (out / "SUMMARY.md").read_text()
    assert "- git commit: abc1234 (from BENCH_GIT_COMMIT" in summary, summary
    assert "| build | not run: time budget spent |" in summary, summary
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert {"gpu-check/SUMMARY.md", "gpu-check/stages.md", "gpu-check/tests-summary.md"} <= set(names), names
    assert not any(scratch.iterdir()), "the work folder is left behind"


def test_prebuilt_folder_is_searched_first_and_only_for_the_running_torch(tmp_path, monkeypatch):
    import torch

    from tvlars_fused import _extension

    monkeypatch.setenv("TVLARS_FUSED_PREBUILT", str(tmp_path))
    (tmp_path / "_C.so").write_bytes(b"\0tvlars_fused built with torch 0.0.1;\0")  # another torch: never loaded
    assert _extension._prebuilt("cpu") != tmp_path / "_C.so"
    (tmp_path / "_C.so").write_bytes(f"\0tvlars_fused built with torch {torch.__version__};\0".encode())
    assert _extension._prebuilt("cpu") == tmp_path / "_C.so"
    assert _extension._prebuilt("cuda") != tmp_path / "_C.so"
