"""Runs only with NUMBA_ENABLE_CUDASIM=1 in the environment, in a pytest process of its own:
the simulator must be chosen before numba is first imported."""
import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.exit("tests/cuda_sim needs NUMBA_ENABLE_CUDASIM=1 (run: NUMBA_ENABLE_CUDASIM=1 pytest tests/cuda_sim)",
                returncode=2)
