"""uvit: a pipeline-orchestrated reproduction of U-ViT (Bao et al., CVPR 2023).

`uvit.models` and `uvit.diffusion` need only torch and einops; the pipeline pieces
(data, train, evaluate, report, stages) import their heavier dependencies where used.
"""

__version__ = "0.1.0"
