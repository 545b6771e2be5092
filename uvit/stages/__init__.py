"""The pipeline's stages: plain functions of a validated config and the artifact paths.

`uvit.stages.table.STAGES` declares every stage once (command, code and data dependencies, the
external files its parameters name, params, outputs, which benchmarks it applies to); the DVC
files are generated from it, and `uvit run` and the Prefect flow walk it. DVC calls the stages
through the `uvit` CLI, tests call the functions directly: one code path for every runner.
"""

from uvit.stages.data import run_data
from uvit.stages.encode import run_encode
from uvit.stages.evaluate import run_classifier, run_sample, run_score
from uvit.stages.publish import run_fetch, run_publish
from uvit.stages.report import run_report
from uvit.stages.table import STAGE_NAMES, STAGES, Stage, chain, get_stage
from uvit.stages.train import run_train
from uvit.stages.validate import run_validate

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "chain", "get_stage", "run_classifier", "run_data", "run_encode",
           "run_fetch", "run_publish", "run_report", "run_sample", "run_score", "run_train", "run_validate"]
