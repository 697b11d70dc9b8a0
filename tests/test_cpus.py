"""``listen.workers: auto`` (the default): one worker per CPU this process may use,
from the affinity mask and the cgroup CPU quota (``corsproxy.cpus``).

The rules are tested on cgroup file trees written here (v2 ``cpu.max``, v1
``cpu.cfs_quota_us``, nested levels, a cgroup namespace); then for real: the
proxy started under ``taskset`` and inside a cgroup with a CPU quota created for
the test (where this machine lets root create one; otherwise that test skips and
says why).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import config_text

from corsproxy.config import parse_config
from corsproxy.cpus import cgroup_quota, usable_cpus

ROOT = Path(__file__).resolve().parent.parent


def tree(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


V2 = "0::/kubepods/pod1/ctr\n"
V1 = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n"


@pytest.mark.parametrize(("files", "affinity", "count", "why"), [
    ({"proc/self/cgroup": V2}, 8, 8, "8 CPUs in the affinity mask, no cgroup CPU quota"),
    ({"proc/self/cgroup": V2, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000"},
     8, 8, "8 CPUs in the affinity mask, no cgroup CPU quota"),
    ({"proc/self/cgroup": V2, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "200000 100000"},
     64, 2, "cgroup v2 /sys/fs/cgroup/kubepods/pod1/ctr/cpu.max: 200000 100000"),
    # 1.5 CPUs round up; 0.25 is still one worker; the affinity caps it.
    ({"proc/self/cgroup": V2, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "150000 100000"},
     64, 2, "quota 1.5 "),
    ({"proc/self/cgroup": V2, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "25000 100000"},
     64, 1, "quota 0.25 "),
    ({"proc/self/cgroup": V2, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "800000 100000"},
     2, 2, "quota 8 "),
    # A parent's limit is tighter than the container's own: the parent's counts.
    ({"proc/self/cgroup": V2, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "400000 100000",
      "sys/fs/cgroup/kubepods/pod1/cpu.max": "300000 100000"},
     64, 3, "/sys/fs/cgroup/kubepods/pod1/cpu.max: 300000 100000"),
    # A cgroup namespace: the process sees its cgroup as the root of the tree.
    ({"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "300000 100000"},
     16, 3, "/sys/fs/cgroup/cpu.max: 300000 100000"),
    ({"proc/self/cgroup": "0::/not/mounted/here\n", "sys/fs/cgroup/cpu.max": "100000 100000"},
     16, 1, "/sys/fs/cgroup/cpu.max"),
    # cgroup v1 (CFS quota; -1 is none), in the combined cpu,cpuacct hierarchy.
    ({"proc/self/cgroup": V1,
      "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
      "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
     32, 3, "cgroup v1 /sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us: 250000 per"),
    ({"proc/self/cgroup": V1,
      "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1",
      "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
     32, 32, "no cgroup CPU quota"),
    # Garbage and missing files mean no quota, never an error.
    ({"proc/self/cgroup": V2, "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "lots"},
     4, 4, "no cgroup CPU quota"),
    ({}, 4, 4, "no cgroup CPU quota"),
])
def test_the_tightest_limit_wins(tmp_path, files, affinity, count, why):
    limit = usable_cpus(tree(tmp_path, files), affinity=affinity)
    assert limit.count == count
    assert why in limit.why


def test_this_machine_reads_without_error():
    limit = usable_cpus()
    assert 1 <= limit.count <= len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    assert quota is None or quota[0] > 0


def test_auto_is_the_default():
    config = parse_config("upstream: {url: 'http://127.0.0.1:9'}\n", "c.yaml")
    assert config.listen.workers == 0  # auto


def run_check(config: Path, prefix: list[str] | None = None, shell: str | None = None) -> str:
    argv = [sys.executable, "-m", "corsproxy", "check", "--config", str(config)]
    if shell is not None:  # enter a cgroup first: sh writes its pid, then execs the check
        argv = ["sh", "-c", f'echo $$ > "{shell}" && exec "$@"', "sh", *argv]
    out = subprocess.run((prefix or []) + argv, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("listen:")]
    return line


@pytest.fixture
def auto_config(tmp_path) -> Path:
    path = tmp_path / "auto.yaml"
    path.write_text(config_text("http://127.0.0.1:9", listen={"workers": "auto"}))
    return path


def test_taskset_limits_auto_to_one_worker(auto_config):
    taskset = shutil.which("taskset")
    assert taskset, "taskset (util-linux) is missing"
    line = run_check(auto_config, [taskset, "-c", "0"])
    assert "1 worker (listen.workers: auto = 1: 1 CPU in the affinity mask" in line


@contextlib.contextmanager
def cpu_cgroup(quota_us: int, period_us: int = 100000):
    """A cgroup with a CPU quota, v2 or v1, removed afterwards; yields the file a
    process writes its pid to in order to join. Skips when this machine can't."""
    name = f"corsproxy-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup")
    v1 = Path("/sys/fs/cgroup/cpu")
    try:
        if (v2 / "cgroup.controllers").exists():
            if "cpu" not in (v2 / "cgroup.controllers").read_text().split():
                pytest.skip("cgroup v2 without the cpu controller")
            if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+cpu")
            group = v2 / name
            group.mkdir()
            (group / "cpu.max").write_text(f"{quota_us} {period_us}")
        elif (v1 / "cpu.cfs_quota_us").exists():
            group = v1 / name
            group.mkdir()
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        else:
            pytest.skip("no cgroup CPU controller mounted at /sys/fs/cgroup")
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup with a CPU quota here ({exc})")
    try:
        yield group / "cgroup.procs"
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


@pytest.mark.parametrize(("quota_us", "workers"), [(50000, 1), (150000, 2)])
def test_a_cgroup_cpu_quota_limits_auto(auto_config, quota_us, workers):
    affinity = len(os.sched_getaffinity(0))
    with cpu_cgroup(quota_us) as procs:
        line = run_check(auto_config, shell=str(procs))
    expected = min(workers, affinity)
    assert f" {expected} worker{'s' if expected != 1 else ''} (listen.workers: auto = " \
        f"{expected}: " in line
    assert f"cgroup CPU quota {quota_us / 100000:g} (cgroup v" in line


def test_the_start_up_line_says_how_many_workers_and_why(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(config_text("http://127.0.0.1:9", listen={"workers": "auto"}))
    taskset = shutil.which("taskset")
    assert taskset
    proc = subprocess.Popen(
        [taskset, "-c", "0", sys.executable, "-m", "corsproxy", "run", "--config", str(path),
         "--log-format", "json"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 20)
        assert ready, "no start-up line within 20 s"
        line = proc.stderr.readline()  # the first line: listening
        record = json.loads(line)
        assert record["event"] == "listening", line
        assert record["workers"] == 1
        assert record["why"].startswith("listen.workers: auto = 1: 1 CPU in the affinity mask")
        assert "; 1 worker (listen.workers: auto = 1: " in record["message"]
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()
