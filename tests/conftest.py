"""Shared fixtures. Tests run on a 2-core machine: one torch thread per process keeps
parallel jobs (Ray workers, helpers) from thrashing each other."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> str:
    """A randomly initialised torch-fidelity InceptionV3 state dict saved where a real one would go.

    The constructor insists on loading weights, so it is fed an empty dict with load_state_dict
    stubbed out; convs are re-initialised with kaiming_normal_ because PyTorch's default init
    gives near-zero pool3 features (FID 0.0) through 90+ layers.
    """
    from torch_fidelity import FeatureExtractorInceptionV3

    empty = tmp_path_factory.mktemp("inc") / "empty.pth"
    torch.save({}, empty)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=str(empty))
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight)
    from uvit.evaluate.fid import INCEPTION_WEIGHTS_FILE

    path = empty.parent / INCEPTION_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return str(path)
