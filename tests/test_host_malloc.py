"""folojax/host_malloc.py: glibc keeps freed blocks for reuse instead of faulting them in again.

The settings are process-wide, so the behaviour is checked in fresh interpreters: one that imports
folojax with FOLOJAX_TUNE_MALLOC=1 (the opt-in), and one that imports it plainly (no change).
"""

import json
import os
import subprocess
import sys

import pytest

from folojax.host_malloc import ENV_VAR, glibc, tune_host_malloc

glibc_only = pytest.mark.skipif(glibc() is None, reason="mallopt is glibc's")

# 40 MB is above the largest mmap threshold glibc picks by itself (32 MB on 64-bit), so by
# default each such block is mapped when allocated and unmapped when freed.
_PAGE_FAULTS_PER_ALLOCATION = """
import json, resource
import numpy as np
import folojax
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(10 * 1024 * 1024, np.float32)  # 40 MB, every page written
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(tune: bool) -> list[int]:
    env = {name: value for name, value in os.environ.items() if name != ENV_VAR}
    if tune:
        env[ENV_VAR] = "1"
    result = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_PER_ALLOCATION], env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_opting_in_keeps_freed_blocks_and_importing_alone_changes_nothing():
    tuned, default = _faults(tune=True), _faults(tune=False)
    # Default: every 40 MB block is faulted in afresh (10,240 pages of 4 KB; fewer if the
    # kernel backs it with huge pages). Tuned: after the first, the freed block is reused.
    assert min(default[1:]) >= 10, default
    assert max(tuned[1:]) * 10 <= min(default[1:]), (tuned, default)


@glibc_only
def test_tune_host_malloc_applies_all_settings(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert tune_host_malloc() is True


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_tune_host_malloc_can_be_turned_off(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    assert tune_host_malloc() is False
