"""The pipeline's stages: plain functions of a validated config and the artifact paths.

DVC calls them through the `uvit` CLI, Prefect flows and tests call them directly: one code
path for every runner. In order: data -> validate -> encode (latent benchmarks) -> train -> sample -> classifier -> score -> report -> publish.
"""

from uvit.stages.data import run_data
from uvit.stages.encode import run_encode
from uvit.stages.evaluate import run_classifier, run_sample, run_score
from uvit.stages.publish import run_fetch, run_publish
from uvit.stages.report import run_report
from uvit.stages.train import run_train
from uvit.stages.validate import run_validate

STAGES = {
    "data": run_data,
    "validate": run_validate,
    "encode": run_encode,
    "train": run_train,
    "sample": run_sample,
    "classifier": run_classifier,
    "score": run_score,
    "report": run_report,
    "publish": run_publish,
}

__all__ = ["STAGES", "run_classifier", "run_data", "run_encode", "run_fetch", "run_publish", "run_report", "run_sample", "run_score", "run_train", "run_validate"]
