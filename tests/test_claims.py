"""analysis/claims.py: the rules of a verdict, each checked on small real result files (runs as
threads) or, where a real run cannot show the case, on edited copies of them."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from conftest import REPO
from snake_mpi.analysis import claims, compare
from snake_mpi.analysis.claims import paper_claims
from snake_mpi.config import load_config
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

SMALL = REPO / "tests" / "configs" / "small.toml"
TINY = REPO / "tests" / "configs" / "tiny.toml"
LM = REPO / "tests" / "configs" / "lm-tiny.toml"
SEEDS = (1, 2, 3)
ACC = "final accuracy / FedAvg's"
PER_ROUND = "bytes per round / FedAvg's"
WHOLE = "bytes, whole run incl. final sync / FedAvg's"
MEAN_REST = "model at rest per node, mean / FedAvg client's"
MAX_REST = "model at rest per node, largest / FedAvg client's"


def run(config, ranks: int, path, sets: list[str]) -> None:
    cfg = load_config(config, ["probes.enabled=false", *sets])
    ThreadWorld(ranks).run(lambda c: execute(cfg, c, path))


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory):
    """Snake P2P on 4 ranks and FedAvg on 5 (4 clients), seeds 1-3; FedAvg on 4 ranks, seed 1."""
    d = tmp_path_factory.mktemp("seeds")
    for s in SEEDS:
        run(SMALL, 4, d / f"snake-s{s}.h5", ['scheme="snake"', f"seed={s}"])
        run(SMALL, 5, d / f"fedavg5-s{s}.h5", ['scheme="fedavg"', f"seed={s}"])
    run(SMALL, 4, d / "fedavg4-s1.h5", ['scheme="fedavg"', "seed=1"])
    return d


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    """A 2-round smoke run of each, Snake on 3 ranks and FedAvg on 4 (3 clients)."""
    d = tmp_path_factory.mktemp("short")
    run(TINY, 3, d / "snake.h5", ['scheme="snake"', "train.rounds=2"])
    run(TINY, 4, d / "fedavg.h5", ['scheme="fedavg"', "train.rounds=2"])
    return d


def results(d, *names):
    return [read_result(d / f"{n}.h5") for n in names]


def by_what(found):
    return {c.what: c for c in found}


def test_too_short_runs_are_not_judged_with_the_reason(short_dir, capsys):
    found = paper_claims(results(short_dir, "snake", "fedavg"), 0.3)
    acc = by_what(found)[ACC]
    assert acc.holds is None
    assert acc.verdict.startswith("not judged: runs too short: ")
    for name in ("snake.h5", "fedavg.h5"):
        assert f"{name}: accuracy 2 evaluation(s), at least 4 needed" in acc.verdict
    assert acc.ratio is not None  # the figures are shown, only the verdict is withheld
    assert by_what(found)[PER_ROUND].holds is not None  # bytes need no convergence
    assert compare.main([str(short_dir)]) == 0
    assert "not judged: runs too short: snake.h5" in capsys.readouterr().out


def test_convergence_compares_the_means_of_the_last_two_windows():
    problem = claims.convergence_problem
    assert problem(np.array([0.5, 0.6, 0.7]), tol=0.01) == "3 evaluation(s), at least 4 needed"
    assert problem(np.array([0.80, 0.81, 0.80, 0.805]), tol=0.01) is None
    why = problem(np.array([0.5, 0.6, 0.7, 0.8]), tol=0.01)
    assert why == (
        "mean changed by 0.2000 between its last two windows of 2 evaluations (tolerance 0.01)"
    )
    rising = np.linspace(0.5, 0.9, 40)  # windows of 5 (40 / 8): 0.41 / 39 per step, 5 steps
    assert "windows of 5 evaluations" in problem(rising, tol=0.01)
    assert problem(np.r_[rising, np.full(10, 0.9)], tol=0.01) is None
    assert problem(np.array([10.0, 10.0, 10.1, 10.1]), tol=0.02, relative=True) is None
    assert "1.0%" in problem(np.array([10.0, 10.0, 10.1, 10.1]), tol=0.005, relative=True)


def edited_copies(src, dst, accuracy: dict[str, list[float]]):
    """Copies of ``src``'s files with /eval/accuracy replaced (name -> curve)."""
    dst.mkdir()
    for name, curve in accuracy.items():
        shutil.copy(src / f"{name}.h5", dst / f"{name}.h5")
        with h5py.File(dst / f"{name}.h5", "r+") as f:
            f["eval/accuracy"][...] = np.asarray(curve)
    return [read_result(dst / f"{name}.h5") for name in accuracy]


def test_converged_runs_are_judged_and_a_moving_or_chance_run_is_not(seeds_dir, tmp_path):
    flat = {f"snake-s{s}": [0.90] * 4 for s in SEEDS}
    flat |= {f"fedavg5-s{s}": [0.92] * 4 for s in SEEDS}
    acc = by_what(paper_claims(edited_copies(seeds_dir, tmp_path / "flat", flat), 0.5))[ACC]
    assert acc.verdict == "holds" and acc.ratio.mean == pytest.approx(0.90 / 0.92)
    moving = flat | {"fedavg5-s2": [0.8, 0.85, 0.9, 0.92]}
    acc = by_what(paper_claims(edited_copies(seeds_dir, tmp_path / "moving", moving), 0.5))[ACC]
    assert acc.verdict == (
        "not judged: runs too short: fedavg5-s2.h5: accuracy mean changed by 0.0850 between "
        "its last two windows of 2 evaluations (tolerance 0.01)"
    )
    chance = flat | {"snake-s3": [0.25, 0.25, 0.25, 0.25]}  # 4 classes: flat, at chance
    acc = by_what(paper_claims(edited_copies(seeds_dir, tmp_path / "chance", chance), 0.5))[ACC]
    assert acc.verdict == (
        "not judged: snake-s3.h5 did not learn (final accuracy 0.2500, chance 0.2500)"
    )


def test_seeds_are_averaged_into_one_row_per_claim(seeds_dir):
    runs = results(seeds_dir, *(f"{k}-s{s}" for s in SEEDS for k in ("snake", "fedavg5")))
    found = paper_claims(runs, 0.8)
    assert len({c.what for c in found}) == len(found)  # one row per claim, not one per seed
    snake = [read_result(seeds_dir / f"snake-s{s}.h5") for s in SEEDS]
    fed = [read_result(seeds_dir / f"fedavg5-s{s}.h5") for s in SEEDS]
    figures = {
        ACC: lambda r: r.evaluation["accuracy"][-1],
        PER_ROUND: lambda r: r.rounds["bytes_sent"].sum(axis=1).mean(),
    }
    for what, figure in figures.items():
        c = by_what(found)[what]
        ratios = [figure(a) / figure(b) for a, b in zip(snake, fed, strict=True)]
        assert c.ratio.values == pytest.approx(ratios)
        assert c.ratio.mean == pytest.approx(np.mean(ratios))
        assert (c.ratio.lo, c.ratio.hi) == (pytest.approx(min(ratios)), pytest.approx(max(ratios)))
        assert c.snake.mean == pytest.approx(np.mean([figure(r) for r in snake]))
        assert c.other.mean == pytest.approx(np.mean([figure(r) for r in fed]))
        lo, hi = f"{min(ratios):.3f}", f"{max(ratios):.3f}"
        assert c.cells()[4] == f"{np.mean(ratios):.3f} [{lo}–{hi}, 3 seeds]"
    accs = [r.evaluation["accuracy"][-1] for r in snake]
    assert len(set(accs)) > 1  # the seeds differ, so the spread means something
    target = by_what(found)["bytes to reach accuracy 0.8000 / FedAvg's"]
    want = [
        r.evaluation["cum_bytes_sent"][np.flatnonzero(r.evaluation["accuracy"] >= 0.8)[0]]
        for r in snake
    ]
    assert target.snake.values == pytest.approx(want)
    never = by_what(paper_claims(runs, 0.999))["bytes to reach accuracy 0.9990 / FedAvg's"]
    assert never.verdict.startswith("not judged: not reached by snake-s1.h5")


def test_a_run_written_before_an_option_existed_groups_with_its_seeds(seeds_dir, tmp_path):
    # a result file from before train.fused_step etc. existed lacks those keys; at their
    # defaults it is the same configuration, so its seed joins the group (a suite that spans
    # the change is still judged on 3 seeds)
    old = tmp_path / "snake-s2.h5"
    shutil.copy(seeds_dir / "snake-s2.h5", old)
    with h5py.File(old, "r+") as f:
        text = f.attrs["config_toml"]
        text = text.decode() if isinstance(text, bytes) else str(text)
        lines = [ln for ln in text.splitlines() if not ln.startswith(NEW_KEYS)]
        assert len(lines) == len(text.splitlines()) - len(NEW_KEYS)
        f.attrs["config_toml"] = "\n".join(lines) + "\n"
    runs = [read_result(seeds_dir / f"snake-s{s}.h5") for s in (1, 3)] + [read_result(old)]
    groups = claims.group_runs(runs)
    assert len(groups) == 1 and groups[0].seeds == [1, 2, 3]
    # a real difference still splits
    with h5py.File(old, "r+") as f:
        f.attrs["config_toml"] = f.attrs["config_toml"].replace("lr = ", "lr = 1", 1)
    assert len(claims.group_runs(runs[:2] + [read_result(old)])) == 2


NEW_KEYS = ("fused_step", "activation_checkpointing", "mmap_threshold_bytes")


def test_data_holders_are_matched_not_ranks(seeds_dir):
    snake, fed5, fed4 = results(seeds_dir, "snake-s1", "fedavg5-s1", "fedavg4-s1")
    assert [claims.data_holders(r) for r in (snake, fed5, fed4)] == [4, 4, 3]
    found = paper_claims([snake, fed4, fed5], 0.8)  # FedAvg on 4 ranks comes first: not used
    assert found and all(c.files == ("snake-s1.h5", "fedavg5-s1.h5") for c in found)
    assert (
        found[0].run
        == "snake-p2p N=4 (4 data holders, 4 rounds) vs fedavg N=5 (4 data holders, 4 rounds)"
    )
    alone = paper_claims([snake, fed4], 0.8)
    assert [c.verdict for c in alone] == [
        "not judged: no fedavg run with 4 data holders and a seed in common "
        "(there are: fedavg N=4 (3 data holders, 4 rounds) seeds 1)"
    ]


def test_the_whole_run_bytes_include_the_final_sync(seeds_dir):
    found = by_what(paper_claims(results(seeds_dir, "snake-s1", "fedavg5-s1"), 0.8))
    with h5py.File(seeds_dir / "snake-s1.h5") as f:
        sync = int(f["final_sync/bytes_sent"][()].sum())
        snake = int(f["rounds/bytes_sent"][()].sum()) + sync
    with h5py.File(seeds_dir / "fedavg5-s1.h5") as f:
        assert "final_sync" not in f
        fed = int(f["rounds/bytes_sent"][()].sum())
    assert sync > 0
    whole = found[WHOLE]
    assert whole.snake.values == (snake,) and whole.other.values == (fed,)
    assert whole.ratio.mean == pytest.approx(snake / fed)


def test_fewer_than_three_seeds_is_indicative(seeds_dir):
    two = results(seeds_dir, "snake-s1", "snake-s2", "fedavg5-s1", "fedavg5-s2")
    judged = [c for c in paper_claims(two, 0.8) if c.holds is not None]
    assert judged and all(c.verdict.endswith("(indicative: 2 seeds, fewer than 3)") for c in judged)
    # seeds only one side has are left out: three Snake seeds against two FedAvg seeds
    three = results(seeds_dir, "snake-s3", "snake-s1", "snake-s2", "fedavg5-s1", "fedavg5-s2")
    found = paper_claims(three, 0.8)
    assert all(
        c.files == ("snake-s1.h5", "snake-s2.h5", "fedavg5-s1.h5", "fedavg5-s2.h5") for c in found
    )
    runs = results(seeds_dir, *(f"{k}-s{s}" for s in SEEDS for k in ("snake", "fedavg5")))
    judged = [c for c in paper_claims(runs, 0.8) if c.holds is not None]
    assert judged and not any("indicative" in c.verdict for c in judged)


def test_each_claim_line_names_its_files(seeds_dir, capsys, tmp_path):
    out_md = tmp_path / "table.md"
    assert compare.main([str(seeds_dir), "--markdown", "--out", str(out_md)]) == 0
    text = capsys.readouterr().out.split(compare.CLAIMS_HEADING, 1)[1]
    lines = [ln for ln in text.splitlines() if ln.startswith("| snake-p2p")]
    assert len(lines) == 6  # 3 bytes, accuracy, 2 storage: one row each, seeds averaged
    files = ", ".join([*(f"snake-s{s}.h5" for s in SEEDS), *(f"fedavg5-s{s}.h5" for s in SEEDS)])
    assert all(ln.endswith(f" | {files} |") for ln in lines)
    assert all(ln in out_md.read_text() for ln in lines)


def test_the_storage_rows_are_model_at_rest_bytes_of_the_data_holders(seeds_dir, tmp_path):
    shutil.copy(seeds_dir / "fedavg5-s1.h5", tmp_path / "fedavg5-s1.h5")
    with h5py.File(tmp_path / "fedavg5-s1.h5", "r+") as f:  # the server: left out
        f["rounds/model_at_rest_bytes"][:, 0] = 10**9
        fed = f["rounds/model_at_rest_bytes"][()][:, 1:].max(axis=0)
    with h5py.File(seeds_dir / "snake-s1.h5") as f:
        snake = f["rounds/model_at_rest_bytes"][()].max(axis=0)
    runs = [read_result(seeds_dir / "snake-s1.h5"), read_result(tmp_path / "fedavg5-s1.h5")]
    found = by_what(paper_claims(runs, 0.8))
    assert found[MEAN_REST].snake.values == (snake.mean(),)
    assert found[MEAN_REST].other.values == (fed.mean(),)
    assert found[MAX_REST].snake.values == (snake.max(),)
    assert found[MAX_REST].other.values == (fed.max(),)
    # Snake keeps the whole model by default: no less than a FedAvg client
    assert found[MEAN_REST].verdict.startswith("does not hold")
    with h5py.File(tmp_path / "fedavg5-s1.h5", "r+") as f:  # a per-rank column wins
        f["ranks/model_at_rest_bytes"] = np.array([0, 10**6, 10**6, 10**6, 2 * 10**6])
    found = by_what(paper_claims([runs[0], read_result(tmp_path / "fedavg5-s1.h5")], 0.8))
    assert found[MAX_REST].other.values == (2 * 10**6,)
    assert found[MAX_REST].verdict.startswith("holds")


def test_language_model_claims_follow_the_same_pairing(tmp_path):
    pytest.importorskip("transformers")
    sets = ["train.rounds=2", "data.n_train=64", "data.n_test=16"]
    run(LM, 2, tmp_path / "snake.h5", ['scheme="snake"', *sets])
    run(LM, 3, tmp_path / "fedavg.h5", ['scheme="fedavg"', *sets])
    run(LM, 1, tmp_path / "full.h5", ['scheme="centralised"', *sets])
    found = by_what(paper_claims(results(tmp_path, "snake", "fedavg", "full"), 0.1))
    ppl = found["final perplexity / FedAvg's"]
    assert ppl.files == ("snake.h5", "fedavg.h5")
    assert ppl.verdict.startswith("not judged: runs too short: snake.h5: perplexity")
    for what in ("training state per node", "peak RSS increase per node"):
        c = found[f"full fine-tuning / Snake, {what}"]
        assert c.files == ("snake.h5", "full.h5") and "indicative: 1 seed" in c.verdict
    full, snake = read_result(tmp_path / "full.h5"), read_result(tmp_path / "snake.h5")
    state = found["full fine-tuning / Snake, training state per node"]
    want = full.rounds["train_state_bytes"].max() / snake.rounds["train_state_bytes"].max()
    assert state.ratio.values == pytest.approx((want,))
