"""bench/guided.py: the painting strategies, the simulated user and the report (stand-in engine)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import guided  # noqa: E402


def column(lo: int, hi: int, n: int = 40) -> np.ndarray:
    mask = np.zeros((n, 8, 8), bool)
    mask[lo : hi + 1, 2:6, 2:6] = True
    return mask


def test_gap_strategy_paints_the_middle_of_the_largest_run_ends_included():
    truth = column(10, 29)
    assert guided.unpainted_runs(10, 29, [15, 25]) == [(10, 14), (16, 24), (26, 29)]
    assert guided.gap_slice(truth, [15, 25]) == 20
    assert guided.gap_slice(truth, [12, 27]) == 19  # runs 10-11, 13-26, 28-29
    assert guided.gap_slice(truth, [22, 24]) == 15  # the run 10-21 before the first painted
    assert guided.gap_slice(truth, list(range(10, 30))) is None


def test_random_strategy_stays_in_the_structure_and_off_painted_slices():
    truth = column(10, 29)
    rng = np.random.default_rng(0)
    picks = {guided.random_slice(truth, [15, 25], rng) for _ in range(200)}
    assert picks <= set(range(10, 30)) - {15, 25} and len(picks) > 10


class FakeRunner:
    """The Runner's interface with an instant engine: each slice copies the nearest painted one;
    confidence falls with the distance to it."""

    def __init__(self, structure, settings=None, mode="fresh", store=None):
        self.s, self.runs, self.signals = structure, 0, []

    def start_sequence(self):
        pass

    def run(self, painted):
        self.runs += 1
        truth, value = self.s.truth, self.s.value
        n = truth.shape[0]
        p = np.array(sorted(painted))
        labels = np.zeros(truth.shape, np.uint8)
        conf = np.full(n, np.nan)
        for t in range(n):
            near = p[np.argmin(np.abs(p - t))]
            labels[t] = truth[near] * value
            if t not in painted:
                conf[t] = 1.0 / (1 + abs(t - near))
        result = types.SimpleNamespace(
            labels=labels, axis=0, annotated=sorted(painted), confidence=conf, disagreement=None
        )
        unpainted = [t for t in range(n) if t not in painted]
        d = guided.dice(labels[unpainted] == value, truth[unpainted])
        return d, result, 0.0


def structure(truth) -> guided.Structure:
    volume = types.SimpleNamespace(name="toy", structures={3: "column"})
    return guided.Structure(volume, 3, truth)


def test_a_simulated_user_paints_one_slice_per_step_up_to_max_k():
    truth = np.zeros((40, 8, 8), bool)
    for t in range(8, 33):
        r = 1 + (t - 8) // 5  # grows along the axis: the nearest-slice copy is wrong
        truth[t, 4 - r // 2 : 4 + r, 4 - r // 2 : 4 + r] = True
    runner = FakeRunner(structure(truth))
    for strategy, seed in (("suggested", None), ("gap", None), ("random", 1)):
        steps = guided.simulate(runner, strategy, [14, 26], 5, seed)
        assert [s.k for s in steps] == [2, 3, 4, 5]
        for a, b in zip(steps, steps[1:], strict=False):
            assert b.painted == sorted(a.painted + [a.next_slice])
        assert steps[-1].next_slice is None
        assert all(0 <= s.dice_unpainted <= 1 for s in steps)
    assert steps[0].structure == "toy:column"


def test_the_report_table_plot_and_csv(tmp_path):
    def step(strategy, k, d, structure="a", seed=None):
        return guided.Step(structure, strategy, seed, k, list(range(k)), d, None, 1.0)

    steps = [
        step("suggested", 2, 0.70),
        step("suggested", 3, 0.80),
        step("gap", 2, 0.70),
        step("gap", 3, 0.78),
        step("random", 2, 0.70, seed=0),
        step("random", 3, 0.60, seed=0),
        step("random", 3, 0.70, seed=1),
        step("gap", 3, 0.88, structure="b"),
    ]
    table = guided.mean_table(steps, ["suggested", "gap", "random"], [2, 3])
    assert table["random", 3] == pytest.approx(0.65)  # mean over seeds
    assert table["gap", 3] == pytest.approx(0.83)  # mean over structures
    text = guided.markdown(table, ["suggested", "gap", "random"], [2, 3], 2)
    assert "| slices painted | suggested | gap | random |" in text
    assert "| 3 | 0.800 | 0.830 | 0.650 |" in text
    assert "not by K = 3" in text
    table["suggested", 3] = 0.9
    assert "reaches it at K = 3" in guided.verdict(table, [2, 3])
    guided.plot(table, ["suggested", "gap", "random"], [2, 3], 2, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0
    guided.write_csv(tmp_path / "g.csv", steps)
    assert len((tmp_path / "g.csv").read_text().splitlines()) == len(steps) + 1


def test_main_on_a_stand_in_engine(tmp_path, monkeypatch, capsys):
    truth = column(10, 29)
    volume = guided.Volume(
        "toy", "CT", np.zeros(truth.shape, np.int16), None, truth.astype(np.uint8), {1: "column"}
    )
    monkeypatch.setattr(guided, "load_ct", lambda: volume)
    monkeypatch.setattr(guided, "Runner", FakeRunner)
    argv = ["--data", "ct", "--max-k", "4", "--random-seeds", "0,1"]
    argv += ["--plot", str(tmp_path / "g.png"), "--csv", str(tmp_path / "g.csv")]
    assert guided.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 4 |" in out and (tmp_path / "g.png").is_file()
    assert guided.main([*argv, "--structures", "nothing"]) == 2


def test_workers_give_the_same_steps_as_one_process(tmp_path, monkeypatch):
    truth = column(10, 29)
    volume = guided.Volume(
        "toy", "CT", np.zeros(truth.shape, np.int16), None, truth.astype(np.uint8), {1: "column"}
    )
    other = guided.Volume(
        "toy2", "CT", np.zeros(truth.shape, np.int16), None, column(5, 30).astype(np.uint8),
        {1: "column"},
    )  # fmt: skip
    monkeypatch.setattr(guided, "load_ct", lambda: volume)
    monkeypatch.setattr(guided, "load_dev", lambda: [other])
    monkeypatch.setattr(guided, "Runner", FakeRunner)
    rows = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.csv"
        argv = ["--data", "ct,dev", "--max-k", "4", "--workers", str(workers), "--csv", str(out)]
        assert guided.main([*argv, "--plot", str(tmp_path / f"w{workers}.png")]) == 0
        rows[workers] = sorted(line.rsplit(",", 1)[0] for line in out.read_text().splitlines())
    assert rows[1] == rows[2] and len(rows[1]) > 2


def test_resume_keeps_finished_structures_and_runs_only_the_rest(tmp_path, monkeypatch):
    """A long run cut short (session end) goes on from its CSV: finished structures are read
    back, not run again, and the table comes out as from one run."""
    volume = guided.Volume(
        "toy", "CT", np.zeros((40, 8, 8), np.int16), None, column(10, 29).astype(np.uint8),
        {1: "column"},
    )  # fmt: skip
    other = guided.Volume(
        "toy2", "CT", np.zeros((40, 8, 8), np.int16), None, column(5, 30).astype(np.uint8),
        {1: "column"},
    )  # fmt: skip
    monkeypatch.setattr(guided, "load_ct", lambda: volume)
    monkeypatch.setattr(guided, "load_dev", lambda: [other])
    ran = []

    class Counting(FakeRunner):
        def run(self, painted):
            ran.append(self.s.name)
            return super().run(painted)

    monkeypatch.setattr(guided, "Runner", Counting)
    whole, part = tmp_path / "whole.csv", tmp_path / "part.csv"
    base = ["--max-k", "4", "--plot", str(tmp_path / "g.png")]
    assert guided.main([*base, "--data", "ct,dev", "--csv", str(whole)]) == 0
    assert guided.main([*base, "--data", "ct", "--csv", str(part)]) == 0  # the cut-short run
    ran.clear()
    assert guided.main([*base, "--data", "ct,dev", "--csv", str(part), "--resume"]) == 0
    assert set(ran) == {"toy2:column"}  # toy was read back
    assert sorted(part.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    ran.clear()
    assert guided.main([*base, "--data", "ct,dev", "--csv", str(part), "--resume"]) == 0
    assert ran == []


def test_signal_check_ranks_the_signal_that_tracks_the_error_first():
    rows = []
    for t in range(8):
        area, conf = 100 + 10 * t, 0.9 - 0.1 * (t % 4)
        rows.append(
            {
                "structure": "a", "painted": "0 9", "slice": t + 1, "distance": min(t + 1, 8 - t),
                "confidence": conf, "disagreement": "nan", "area_predicted": area,
                "error_voxels": round(area * (1 - conf)),
            }
        )  # fmt: skip
    text = guided.signal_check(rows)
    assert "(1 propagations)" in text
    assert "| expected error (area x unsureness) | 1.00 | " in text
    expected_share = sorted((r["error_voxels"] for r in rows), reverse=True)[:3]
    share = sum(expected_share) / sum(r["error_voxels"] for r in rows)
    assert f"| expected error (area x unsureness) | 1.00 | {share:.2f} |" in text
    assert "| predicted area | 1.00 |" not in text  # area alone misses the unsureness
