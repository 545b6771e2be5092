"""uvit.sharded_work: pieces planned, verified ones kept, the rest computed here or shipped back from
Ray tasks and received on the driver."""

from __future__ import annotations

import uvit.sharded_work as sharded_work
from uvit.sharded_work import Piece, Progress, RemoteTask, ShardedWork, Workers, plan_pieces, run_sharded


def _squares(piece: Piece) -> list[int]:
    return [r * r for r in range(piece.start, piece.start + piece.count)]


def _work(done_on_disk: set[int], receive=None) -> ShardedWork:
    extra = {} if receive is None else {"receive": receive}
    return ShardedWork(
        total=10,
        piece_size=4,
        verified=lambda piece: _squares(piece) if piece.index in done_on_disk else None,
        local=lambda: _squares,
        remote=RemoteTask(lambda tag, piece, device: (tag, _squares(piece)), lambda: ("shipped",)),
        progress=Progress("squares", show=False),
        **extra,
    )


def _as_if_on_ray(remote, todo, workers, done) -> None:
    """Ray's completion loop without Ray: each piece's task result, in order."""
    for piece in todo:
        done(piece, remote.fn(*remote.shared(), piece, "cpu"))


def test_plan_and_reuse() -> None:
    assert plan_pieces(10, 4) == [Piece(0, 0, 4), Piece(1, 4, 4), Piece(2, 8, 2)]
    result = run_sharded(_work({1}), Workers(1))
    assert result.reused == [1] and result.computed == [0, 2] and result.rows_computed == 6
    assert [x for k in sorted(result.results) for x in result.results[k]] == [r * r for r in range(10)]


def test_what_a_task_ships_is_received_on_the_driver(monkeypatch, tmp_path) -> None:
    """A task's result goes through `receive` (which writes what it shipped here) before bookkeeping."""
    monkeypatch.setattr(sharded_work, "_run_on_ray", _as_if_on_ray)

    def receive(piece: Piece, shipped: tuple[str, list[int]]) -> list[int]:
        tag, rows = shipped
        (tmp_path / f"{tag}-{piece.index}.txt").write_text(" ".join(map(str, rows)))
        return rows

    result = run_sharded(_work({2}, receive), Workers(2))
    assert result.computed == [0, 1] and result.results[1] == [16, 25, 36, 49] and result.results[2] == [64, 81]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shipped-0.txt", "shipped-1.txt"]
    assert (tmp_path / "shipped-1.txt").read_text() == "16 25 36 49"
    untouched = run_sharded(_work(set()), Workers(2))  # no receive: the shipped value is the result
    assert untouched.results[0] == ("shipped", [0, 1, 4, 9])
