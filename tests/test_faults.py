"""A fast slice of the fault sweep (tests/faults/sweep.py): two cases of every family that runs
in-process, each checking exit status 2, one error line naming the file / tensor / key, and that
nothing was lost. The full sweep is `python tests/faults/sweep.py`: 580 cases in 22 families, full
disks included, all 580 passing on 2026-12-07 (175 s on the 2-core CPU shared with other developers'
jobs; the count of each family: docs/safety.md)."""

import pytest

from faults.sweep import CASES, Base, run_case

SLOW = ("full-disk", "train-resume")  # subprocesses on a tmpfs / a training run: the full sweep has them
FAMILIES = sorted({c.family for c in CASES} - set(SLOW))
SLICE = [c for family in FAMILIES for c in [c for c in CASES if c.family == family][::17][:2]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return Base(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("case", SLICE, ids=[f"{c.family}: {c.name}" for c in SLICE])
def test_fault(case, base, tmp_path):
    result = run_case(case, base, tmp_path, use_subprocess=False)
    assert result.ok, f"{result.problem} (exit status {result.status}; message: {result.message})"
