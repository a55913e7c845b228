import os
import sys

import pytest
import torch

# Helpers shared by tests/unit and tests/distributed (tests/_models.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs one worker per core, `-n`) each worker takes its share of the cores,
# so that two workers do not both run two-thread kernels on two cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def tiny_processor():
    from longvila.processor import LongVILAProcessor

    return LongVILAProcessor.tiny()


@pytest.fixture
def tiny_model():
    from longvila import LongVILA, LongVILAConfig

    torch.manual_seed(0)
    return LongVILA(LongVILAConfig.tiny()).eval()


# Once every test has run and the summary is printed, leave without interpreter teardown. A native thread
# started by one of the libraries under test (seen once in CI as "terminate called without an active
# exception" after "403 passed") can abort the process during teardown and turn a green run red; the
# exit status pytest computed (failures, or 5 for "no tests") is kept as it is.
def pytest_sessionfinish(session, exitstatus):
    session.config._longvila_exit_status = int(exitstatus)


def pytest_unconfigure(config):
    status = getattr(config, "_longvila_exit_status", None)
    if hasattr(config, "workerinput"):  # an xdist worker: its controller ends it; the controller exits hard
        return
    if status is not None and os.environ.get("LONGVILA_PYTEST_HARD_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
