"""Guided painting: does painting the suggested slice beat the gap rule of thumb and chance?

A simulated user starts from K = ``--start-k`` (2) slices painted evenly over a structure
(``cases.paint_slices(truth, "even", K)``), propagates with OFL-SAM2 (LiteMedSAM, the default
``Settings``, CPU), then paints one more slice, taking the ground truth on it, and propagates
again, up to K = ``--max-k`` (8). The next slice is chosen by one of three strategies:

- ``suggested``: the top slice of :func:`oflsam2.guidance.suggest` on the last result (what
  ``oflsam2 segment --json`` reports and the Slicer panel shows);
- ``gap``: the middle of the largest run of unpainted slices within the structure's extent
  (the ends count as runs too: from the first slice holding the structure to the first painted
  one, and likewise at the other end); ties: the first run;
- ``random``: an unpainted slice within the structure's extent, uniformly at random (one
  simulated user per ``--random-seeds`` seed; the row is their mean).

Every propagation names its painted slices (``fit(..., slices=painted)``), so a suggested slice
where the structure is absent is painted as "absent here", as a user would tell the tool.
Measured after each propagation: Dice on the slices not painted (all their voxels together,
as in ``accuracy.py``), averaged over the structures.

One segmenter per structure keeps the encoded slices across all steps and strategies (the same
array object). ``--mode fresh`` (default) forgets the learners before each fit
(``OFLSegmenter.reset``), so a result depends on the painted slices only and is reused where
two strategies paint the same slices (K = start-k always); ``--mode warm`` keeps them along
each strategy's sequence, as the Slicer panel does between propagations. Either way the
intensity window is the first painting's.

Output: a markdown table (mean Dice per strategy and K) on stdout, ``--plot``
(``bench/results/guided.png``) and a per-step CSV (``bench/results/guided.csv``).

Usage: ``python bench/guided.py [--data ct,dev] [--structures NAME,...] [--max-k 8]
[--strategies suggested,gap,random] [--random-seeds 0] [--mode fresh|warm] [--threads N]
[--workers N] [--feature-cache DIR] [--resume]``. ``--workers`` runs structures in forked
processes; ``--feature-cache`` keeps encoded slices on disk (``accuracy.cached_segmenter``);
``--resume`` goes on from the CSV of a run that was cut short (the full run takes hours).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import (  # noqa: E402
    AXIS,
    Volume,
    extent,
    in_processes,
    load_ct,
    load_dev,
    paint_slices,
    structures,
)

from oflsam2.metrics import dice  # noqa: E402

STRATEGIES = ("suggested", "gap", "random")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Structure:
    volume: Volume
    value: int
    truth: np.ndarray = field(repr=False)  # bool (k, j, i)

    @property
    def name(self) -> str:
        return f"{self.volume.name}:{self.volume.structures[self.value]}"


@dataclass
class Step:
    structure: str
    strategy: str
    seed: int | None
    k: int
    painted: list[int]
    dice_unpainted: float
    next_slice: int | None  # the slice this strategy paints next
    seconds: float  # engine time of this step (0 when reused)


# ---------------------------------------------------------------- strategies (plain numpy)


def unpainted_runs(lo: int, hi: int, painted: list[int]) -> list[tuple[int, int]]:
    """Runs [a, b] of unpainted slices within [lo, hi], in order."""
    runs, start = [], None
    for t in range(lo, hi + 1):
        if t in painted:
            if start is not None:
                runs.append((start, t - 1))
            start = None
        elif start is None:
            start = t
    if start is not None:
        runs.append((start, hi))
    return runs


def gap_slice(truth: np.ndarray, painted: list[int]) -> int | None:
    """The middle of the largest run of unpainted slices within the structure's extent."""
    runs = unpainted_runs(*extent(truth, AXIS), painted)
    if not runs:
        return None
    a, b = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
    return (a + b) // 2


def random_slice(truth: np.ndarray, painted: list[int], rng: np.random.Generator) -> int | None:
    lo, hi = extent(truth, AXIS)
    free = [t for t in range(lo, hi + 1) if t not in painted]
    return int(rng.choice(free)) if free else None


def suggested_slice(result) -> int | None:
    from oflsam2.guidance import suggest

    top = suggest(result, top=1)
    return top[0].slice if top else None


# ---------------------------------------------------------------- the engine


class Runner:
    """One structure's segmenter: a propagation per painted set (cached in fresh mode)."""

    def __init__(self, structure: Structure, settings, mode: str, store: Path | None = None):
        from accuracy import cached_segmenter

        self.s, self.settings, self.mode = structure, settings, mode
        self.seg = cached_segmenter(store)(settings)
        self.seg.volume_name = structure.volume.name  # the feature cache's key
        self.cache: dict[tuple[int, ...], tuple[float, object, float]] = {}
        self.signals: list[dict] = []  # per propagated slice: the engine's signals, the error

    def start_sequence(self) -> None:
        if self.mode == "warm":
            self.seg.reset(self.settings)

    def run(self, painted: list[int]) -> tuple[float, object, float]:
        """(Dice on unpainted slices, engine result, seconds; 0 when reused)."""
        key = tuple(sorted(painted))
        if self.mode == "fresh" and key in self.cache:
            d, result, _ = self.cache[key]
            return d, result, 0.0
        s, v = self.s, self.s.volume
        sparse = np.zeros(s.truth.shape, np.uint8)
        sparse[list(key)] = s.truth[list(key)].astype(np.uint8) * s.value
        t0 = time.perf_counter()
        if self.mode == "fresh":
            self.seg.reset(self.settings)
        self.seg.set_volume(v.array, v.geometry, v.modality)
        self.seg.fit(sparse, slices=list(key), axis=AXIS)
        result = self.seg.propagate()
        seconds = time.perf_counter() - t0
        unpainted = [t for t in range(s.truth.shape[AXIS]) if t not in key]
        d = dice(result.labels[unpainted] == s.value, s.truth[unpainted])
        if self.mode == "fresh":
            self.cache[key] = (d, result, seconds)
        self.signals += slice_signals(s, list(key), result)
        return d, result, seconds


def slice_signals(s: Structure, painted: list[int], result) -> list[dict]:
    """Per unpainted slice of one propagation: what the guidance sees and the true error, to
    check its measure (``--signals``)."""
    rows = []
    dis = result.disagreement
    for t in range(s.truth.shape[AXIS]):
        if t in painted:
            continue
        pred, true = result.labels[t] == s.value, s.truth[t]
        if not (pred.any() or true.any()):
            continue
        rows.append(
            {
                "structure": s.name,
                "k": len(painted),
                "painted": " ".join(map(str, painted)),
                "slice": t,
                "distance": min(abs(t - p) for p in painted),
                "confidence": float(result.confidence[t]),
                "disagreement": float("nan") if dis is None else float(dis[t]),
                "area_predicted": int(pred.sum()),
                "area_true": int(true.sum()),
                "error_voxels": int((pred ^ true).sum()),
            }
        )
    return rows


def simulate(
    runner: Runner, strategy: str, start: list[int], max_k: int, seed: int | None
) -> list[Step]:
    """One simulated user: paint, propagate, pick the next slice by ``strategy``, repeat."""
    s = runner.s
    rng = np.random.default_rng(seed)
    painted = list(start)
    runner.start_sequence()
    steps = []
    while True:
        d, result, seconds = runner.run(painted)
        k = len(painted)
        nxt = None
        if k < max_k:
            if strategy == "suggested":
                nxt = suggested_slice(result)
            elif strategy == "gap":
                nxt = gap_slice(s.truth, painted)
            else:
                nxt = random_slice(s.truth, painted, rng)
        steps.append(Step(s.name, strategy, seed, k, sorted(painted), d, nxt, seconds))
        print(
            f"  {s.name} {strategy}{'' if seed is None else f' seed {seed}'} K={k} "
            f"painted {sorted(painted)}: Dice {d:.3f} ({seconds:.0f} s)"
            + (f", next {nxt}" if nxt is not None else ""),
            file=sys.stderr,
            flush=True,
        )
        if nxt is None:
            return steps
        painted.append(nxt)


# ---------------------------------------------------------------- reporting


def mean_table(steps: list[Step], strategies: list[str], ks: list[int]) -> dict:
    """(strategy, k) -> mean Dice over structures (random: each structure's mean over seeds)."""
    out = {}
    for strategy in strategies:
        for k in ks:
            per = {}
            for st in steps:
                if st.strategy == strategy and st.k == k:
                    per.setdefault(st.structure, []).append(st.dice_unpainted)
            if per:
                out[strategy, k] = float(np.mean([np.mean(v) for v in per.values()]))
    return out


def markdown(table: dict, strategies: list[str], ks: list[int], n_structures: int) -> str:
    lines = [
        f"Mean Dice on unpainted slices over {n_structures} structure(s):",
        "",
        "| slices painted | " + " | ".join(strategies) + " |",
        "|---" * (len(strategies) + 1) + "|",
    ]
    for k in ks:
        cells = [f"{table[s, k]:.3f}" if (s, k) in table else "" for s in strategies]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    target = verdict(table, ks)
    if target:
        lines += ["", target]
    return "\n".join(lines)


def verdict(table: dict, ks: list[int]) -> str:
    """When the suggestion first reaches the gap strategy's Dice at the largest K."""
    last = max(ks)
    if ("gap", last) not in table:
        return ""
    goal = table["gap", last]
    reached = [k for k in ks if table.get(("suggested", k), -1.0) >= goal]
    when = f"at K = {reached[0]}" if reached else f"not by K = {last}"
    if reached and reached[0] == ks[0]:
        when += " (the common start: the gap strategy ends no better than it began)"
    return f"Gap strategy at K = {last}: {goal:.3f}; the suggestion reaches it {when}."


SIGNALS = {  # what the guidance could rank slices by (oflsam2.guidance; the floor left out)
    "expected error (area x unsureness)": lambda r: r["area"] * r["u"],
    "unsureness (1 - confidence, or disagreement)": lambda r: r["u"],
    "predicted area": lambda r: r["area"],
    "distance to a painted slice": lambda r: r["distance"],
}


def signal_check(rows: list[dict]) -> str:
    """How well each signal ranks the slices of one propagation by their true error: Spearman's
    rho, and the share of the true wrong voxels on the 3 slices it ranks highest, both averaged
    over propagations (``--signals``; the data behind the guidance's measure)."""
    from scipy.stats import spearmanr

    from oflsam2.guidance import uncertainty

    runs: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        conf, dis = [float(r["confidence"])], [float(r["disagreement"])]
        item = {
            "u": float(uncertainty(np.array(conf), np.array(dis))[0]),
            "area": float(r["area_predicted"]),
            "distance": float(r["distance"]),
            "error": float(r["error_voxels"]),
        }
        runs.setdefault((r["structure"], r["painted"]), []).append(item)
    lines = [
        f"Signals against the true error per slice ({len(runs)} propagations):",
        "",
        "| signal | Spearman rho (mean) | share of the error on its top 3 slices |",
        "|---|---|---|",
    ]
    for name, signal in SIGNALS.items():
        rhos, shares = [], []
        for items in runs.values():
            err = np.array([i["error"] for i in items])
            val = np.array([signal(i) for i in items])
            if len(items) < 3 or err.sum() == 0:
                continue
            if np.ptp(val) > 0 and np.ptp(err) > 0:
                rhos.append(spearmanr(val, err).statistic)
            top = np.argsort(-val, kind="stable")[:3]
            shares.append(err[top].sum() / err.sum())
        rho = f"{np.mean(rhos):.2f}" if rhos else ""
        share = f"{np.mean(shares):.2f}" if shares else ""
        lines.append(f"| {name} | {rho} | {share} |")
    return "\n".join(lines)


def plot(table: dict, strategies: list[str], ks: list[int], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    styles = {"suggested": ("#d62728", "o"), "gap": ("#1f77b4", "s"), "random": ("#7f7f7f", "^")}
    for s in strategies:
        xs = [k for k in ks if (s, k) in table]
        colour, marker = styles.get(s, ("k", "."))
        ax.plot(xs, [table[s, k] for k in xs], marker=marker, color=colour, label=s)
    ax.set_xlabel("slices painted")
    ax.set_ylabel("Dice on unpainted slices (mean)")
    ax.set_xticks(ks)
    ax.set_title(f"Guided painting, OFL-SAM2 LiteMedSAM, {n} structure(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_csv(path: Path, steps: list[Step]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["structure", "strategy", "seed", "k", "painted", "dice_unpainted", "next", "seconds"]
        )
        for st in steps:
            w.writerow(
                [
                    st.structure,
                    st.strategy,
                    "" if st.seed is None else st.seed,
                    st.k,
                    " ".join(map(str, st.painted)),
                    f"{st.dice_unpainted:.4f}",
                    "" if st.next_slice is None else st.next_slice,
                    f"{st.seconds:.1f}",
                ]
            )


def read_csv(path: Path) -> list[Step]:
    """The steps ``write_csv`` wrote (``--resume``)."""
    with open(path, newline="") as fh:
        return [
            Step(
                r["structure"],
                r["strategy"],
                int(r["seed"]) if r["seed"] else None,
                int(r["k"]),
                [int(t) for t in r["painted"].split()],
                float(r["dice_unpainted"]),
                int(r["next"]) if r["next"] else None,
                float(r["seconds"]),
            )
            for r in csv.DictReader(fh)
        ]


def write_signals(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------- main


def select(volumes: list[Volume], only: set[str] | None) -> list[Structure]:
    out = []
    for volume in volumes:
        for value in structures(volume):
            name = f"{volume.name}:{volume.structures[value]}"
            if only and not ({name, volume.name, volume.structures[value]} & only):
                continue
            out.append(Structure(volume, value, volume.labels == value))
    return out


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="ct,dev", help="ct, dev or both (dev: ../shared/data/dev)")
    p.add_argument("--structures", default="", help="volume or structure names to keep")
    p.add_argument("--start-k", type=int, default=2)
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--random-seeds", default="0", help="one simulated random user per seed")
    p.add_argument("--mode", choices=("fresh", "warm"), default="fresh")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--plot", default=str(RESULTS / "guided.png"))
    p.add_argument("--csv", default=str(RESULTS / "guided.csv"))
    p.add_argument("--signals", default="", help="CSV of per-slice signals and true errors")
    p.add_argument("--workers", type=int, default=1, help="processes running structures")
    p.add_argument("--feature-cache", help="folder keeping encoded slices across runs")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the structures already in --csv (and --signals) from a run with the same "
        "options that was cut short; run only the others",
    )
    args = p.parse_args(argv)
    unknown = set(_list(args.strategies)) - set(STRATEGIES)
    if unknown or not 1 <= args.start_k <= args.max_k:
        p.error(f"strategies are {', '.join(STRATEGIES)}; 1 <= --start-k <= --max-k")
    return args


def run_structure(structure: Structure, job: tuple) -> tuple[list[Step], list[dict]]:
    """Every simulated user of one structure: its steps and per-slice signals."""
    args, settings, store = job
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = paint_slices(structure.truth, "even", args.start_k)
    runner = Runner(structure, settings, args.mode, store)
    steps = []
    for strategy in _list(args.strategies):
        for seed in [int(x) for x in _list(args.random_seeds)] if strategy == "random" else [None]:
            steps += simulate(runner, strategy, start, args.max_k, seed)
    return steps, runner.signals


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from oflsam2.settings import Settings

    data = set(_list(args.data))
    volumes = ([load_ct()] if "ct" in data else []) + (load_dev() if "dev" in data else [])
    chosen = select(volumes, set(_list(args.structures)) or None)
    if not chosen:
        print("no structure selected", file=sys.stderr)
        return 2
    store = Path(args.feature_cache) if args.feature_cache else None
    job = (args, Settings(device=args.device), store)
    steps: list[Step] = []
    signals: list[dict] = []
    if args.resume and Path(args.csv).is_file():  # a structure's rows are written once it ends
        names = {s.name for s in chosen}
        steps = [st for st in read_csv(Path(args.csv)) if st.structure in names]
        if args.signals and Path(args.signals).is_file():
            with open(args.signals, newline="") as fh:
                signals = [r for r in csv.DictReader(fh) if r["structure"] in names]
        done = {st.structure for st in steps}
        print(f"resuming: {len(done)} structure(s) read from {args.csv}", file=sys.stderr)
    else:
        done = set()
    todo = [s for s in chosen if s.name not in done]
    t0 = time.perf_counter()
    for got, seen in in_processes(run_structure, todo, job, args.workers):  # saved as they come
        steps += got
        signals += seen
        write_csv(Path(args.csv), steps)
        if args.signals:
            write_signals(Path(args.signals), signals)
    strategies = _list(args.strategies)
    ks = list(range(args.start_k, args.max_k + 1))
    table = mean_table(steps, strategies, ks)
    plot(table, strategies, ks, len(chosen), Path(args.plot))
    print(markdown(table, strategies, ks, len(chosen)))
    if signals:
        print("\n" + signal_check(signals))
    print(
        f"\n{len(chosen)} structure(s) ({', '.join(s.name for s in chosen)}), mode {args.mode}, "
        f"{time.perf_counter() - t0:.0f} s; wrote {args.plot} and {args.csv}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
