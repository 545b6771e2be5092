"""Prefect orchestration of the uvit pipeline: one flow, one task per `uvit.stages` function.

See `pipelines/README.md` for the server, work pool, deployments and worker commands.
"""
