"""A miniature of the latent paper chains through DVC (data -> validate -> encode -> train ->
sample -> score -> report -> publish): ImageNet 256 from a class tar with its declared sha256,
ImageNet 512 from class folders, MS-COCO 256 with captions and CLIP; a tiny VAE in the official
autoencoder_kl.pth format. Then: a second `dvc repro` runs nothing, and a replaced weight file or a
changed parameter re-runs exactly the stages that read it (tests/test_paper_chains.py: pixels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chains import check_chain, inputs, project, ran, second_repro_runs_nothing, set_and_repro  # noqa: F401

pytestmark = pytest.mark.slow
BENCHMARKS = ("imagenet256", "imagenet512", "mscoco256")


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_chain_runs_end_to_end(project, benchmark, dvc):
    check_chain(project, benchmark, dvc(["repro", f"paper/dvc.yaml:publish@{benchmark}"], project))


def test_second_repro_runs_nothing(project, dvc):
    second_repro_runs_nothing(project, BENCHMARKS, dvc)


def test_a_new_weight_file_or_parameter_reruns_what_reads_it(inputs, project, dvc):
    """A weight file and a parameter value, each changed once: exactly the stages that read it,
    and what depends on their new outputs, run again."""
    _, overrides = inputs
    # 1. The Inception weights replaced (the same format, other weights): score and what reads it.
    # (A replaced VAE re-runs encode onward the same way; `score` is the cheapest reader to rerun.)
    weights = Path(overrides["imagenet256"]["score"]["inception_weights"])
    torch.manual_seed(1)
    state = torch.load(weights, weights_only=True)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, weights)
    out = dvc(["repro", "paper/dvc.yaml:publish@imagenet256"], project)
    assert ran(out) == {f"{s}@imagenet256" for s in ("score", "report", "publish")}
    # 2. A parameter of the sample stage: sample and what reads the samples.
    out = set_and_repro(dvc, project, "imagenet256", ("sample", "seed"), 7)
    assert ran(out) == {f"{s}@imagenet256" for s in ("sample", "score", "report", "publish")}
