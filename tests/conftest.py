import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_processor():
    from longvila.processor import LongVILAProcessor

    return LongVILAProcessor.tiny()


@pytest.fixture
def tiny_model():
    from longvila import LongVILA, LongVILAConfig

    torch.manual_seed(0)
    return LongVILA(LongVILAConfig.tiny()).eval()
