"""uvit.sharded_work: pieces planned, verified ones kept, the rest computed; a Ray piece whose files
the driver cannot see stops the run with what to do."""

from __future__ import annotations

import pytest

import uvit.sharded_work as sharded_work
from uvit.sharded_work import Piece, Progress, RemoteTask, ShardedWork, Workers, plan_pieces, run_sharded


def _work(done_on_disk: set[int], landed=None) -> ShardedWork:
    square = lambda piece: [r * r for r in range(piece.start, piece.start + piece.count)]  # noqa: E731
    return ShardedWork(
        total=10,
        piece_size=4,
        verified=lambda piece: square(piece) if piece.index in done_on_disk else None,
        local=lambda: square,
        remote=RemoteTask(lambda piece, device: square(piece), lambda: ()),
        progress=Progress("squares", show=False),
        landed=landed,
    )


def _as_if_on_ray(remote, todo, workers, done) -> None:
    """Ray's completion loop without Ray: each piece's task result, in order."""
    for piece in todo:
        done(piece, remote.fn(piece, "cpu"))


def test_plan_and_reuse() -> None:
    assert plan_pieces(10, 4) == [Piece(0, 0, 4), Piece(1, 4, 4), Piece(2, 8, 2)]
    result = run_sharded(_work({1}), Workers(1))
    assert result.reused == [1] and result.computed == [0, 2] and result.rows_computed == 6
    assert [x for k in sorted(result.results) for x in result.results[k]] == [r * r for r in range(10)]


def test_ray_pieces_must_land_where_the_driver_can_see_them(monkeypatch) -> None:
    monkeypatch.setattr(sharded_work, "_run_on_ray", _as_if_on_ray)
    seen = run_sharded(_work(set(), landed=lambda piece, result: True), Workers(2))
    assert seen.computed == [0, 1, 2] and seen.results[2] == [64, 81]
    with pytest.raises(FileNotFoundError, match=r"squares: piece 0 \(rows 0..3\).*filesystem every node mounts"):
        run_sharded(_work(set(), landed=lambda piece, result: piece.index != 0), Workers(2))
