"""Budget plan_lib: byte accounting, Pareto frontier, choice, config files, the `plan` CLI."""

import json
from pathlib import Path

import numpy as np
import pytest

import adaptor
from adaptor import plan as plan_lib
from adaptor.plan import Candidate, Grid
from adaptor.index import MatryoshkaIndex

DATA = Path(__file__).resolve().parents[1] / "data" / "scifact"
EMB = DATA / "embeddings" / "all-MiniLM-L6-v2"


def _cand(schedule, memory, stored, quality, ms):
  return Candidate(schedule=schedule, memory_bytes=memory, stored_bytes=stored, quality=quality,
                   relative=quality / 0.8, ms_per_query=ms)


def test_candidate_schedules_and_byte_accounting():
  sch = plan_lib.candidate_schedules(64, 10, 1000, Grid(dims=(16, 64), shortlists=(4,)))
  assert ((16, 10, "binary"),) in sch and ((64, 10, "float32"),) in sch
  assert ((16, 40, "binary"), (64, 10, "float32")) in sch
  assert ((16, 40, "binary"), (16, 10, "int8")) in sch           # same dims, finer precision
  assert ((16, 40, "int8"), (16, 10, "int8")) not in sch         # nothing new to rescore with
  assert ((64, 40, "binary"), (16, 10, "int8")) in sch            # fewer, finer dims
  assert ((16, 100, "binary"), (64, 40, "int8"), (64, 10, "float32")) in sch
  assert len(sch) == len(set(sch))
  b = plan_lib.schedule_bytes(((256, 400, "binary"), (256, 40, "int8"), (768, 10, "float32")), 768)
  assert b == {"first_stage": 32.0, "stored": 32 + 256 + 4 * 768}
  assert plan_lib.schedule_bytes(((64, 10, "float32"),), 768) == {"first_stage": 260.0, "stored": 4 * 768 + 4.0}
  assert plan_lib.schedule_bytes(((64, 10, "float32"),), 768, float_itemsize=2)["first_stage"] == 132.0
  assert plan_lib.schedule_bytes(((64, 100, "int8"), (768, 10, "binary")), 768) == {
      "first_stage": 64.0, "stored": 64 + 96.0}
  assert plan_lib.stores_for(((256, 400, "binary"), (768, 40, "binary"), (64, 10, "int8"))) == [
      ("binary", 768), ("int8", 64)]


def test_pareto_front_and_choice():
  c = [_cand(((8, 10, "binary"),), 1, 1, 0.30, 0.1),         # 0 cheapest
       _cand(((64, 10, "binary"),), 8, 8, 0.50, 0.2),         # 1
       _cand(((64, 10, "int8"),), 64, 64, 0.48, 0.5),         # 2 dominated by 1
       _cand(((64, 40, "binary"), (64, 10)), 8, 264, 0.70, 0.3),  # 3 beats 1 on quality
       _cand(((64, 10, "float32"),), 256, 256, 0.80, 0.4)]    # 4 full float
  assert plan_lib.pareto_front(c) == [0, 3, 1, 4]         # by bytes, then better quality
  assert plan_lib.pareto_front(c, "all") == [0, 1, 4, 3]   # by stored bytes 1, 8, 256, 264
  assert plan_lib.choose(c, bytes_per_vector=8) == 3
  assert plan_lib.choose(c, bytes_per_vector=100, convention="all") == 1   # budget excludes float
  assert plan_lib.choose(c, quality=0.85) == 3      # relative 0.875: fewest bytes, better than 1
  assert plan_lib.choose(c, quality=1.0) == 4
  with pytest.raises(adaptor.InputError, match=r"smallest needs 1 bytes/vector .*got 0.5"):
    plan_lib.choose(c, bytes_per_vector=0.5)
  with pytest.raises(adaptor.InputError, match=r"best configuration keeps 1.0000 .*got 1.1"):
    plan_lib.choose(c, quality=1.1)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_rows(queries, corpus, k, dim):
  """Top-k rows by float64 cosine at the dim-prefix (full stable sort)."""
  scores = _unit(queries[:, :dim]) @ _unit(corpus[:, :dim]).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_plan_schedule_reaches_target_and_is_cheapest():
  rng = np.random.default_rng(6)
  # Matryoshka-like: energy decays along the coordinates, so short prefixes rank well.
  corpus = (rng.normal(size=(600, 256)) * np.linspace(1.0, 0.02, 256) ** 2).astype(np.float32)
  queries = corpus[:40] + 0.1 * rng.normal(size=(40, 256)).astype(np.float32)
  index = MatryoshkaIndex.build(corpus)
  kw = dict(k=5, first_keeps=(10, 40, 200), middle_keeps=(20,), corpus_size=100_000)
  plan = plan_lib.plan_schedule(index, queries, **kw)
  _, exact = index.search_rows(queries, 5)
  _, funnel = index.search_rows(queries, 5, schedule=plan.schedule)
  hits = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(funnel, exact)])
  assert plan.recall >= 0.99 and hits == pytest.approx(plan.recall)
  assert plan.speedup > 1 and plan.schedule[-1] == (256, 5, "float32") and len(plan.schedule) > 1
  costs = [c["cost"] for c in plan.candidates]
  assert costs == sorted(costs) and all(c["recall"] < 0.99 for c in plan.candidates[:-1])
  assert len(plan.candidates) >= 5 and min(c["recall"] for c in plan.candidates) < 0.9
  # Every measured recall against a numpy float64 funnel: full sorts of the
  # cosines at each stage's prefix, and the true full-size top 5.
  truth = _brute_rows(queries, corpus, 5, 256)
  for c in plan.candidates:
    (m1, k1, _), *rest = c["schedule"]
    rows = _brute_rows(queries, corpus, k1, m1)
    for m, keep, _ in rest:
      sc = np.einsum("qd,qcd->qc", _unit(queries[:, :m]), _unit(corpus[:, :m])[rows])
      rows = np.take_along_axis(rows, np.argsort(-sc, axis=1, kind="stable")[:, :keep], axis=1)
    want = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, truth)])
    assert c["recall"] == pytest.approx(want, abs=1e-12), c["label"]
  assert all(c < plan.exact_cost for c in costs)
  hard = plan_lib.plan_schedule(index, queries, k=5, first_dims=(1,), first_keeps=(10,), middle_keeps=())
  assert hard.schedule == ((256, 5, "float32"),) and hard.speedup == 1.0


def _tiny_data():
  rng = np.random.default_rng(0)
  corpus = (rng.normal(size=(400, 64)) * np.linspace(1.0, 0.05, 64)).astype(np.float32)
  queries = corpus[:30] + 0.05 * rng.normal(size=(30, 64)).astype(np.float32)
  return corpus, queries


@pytest.fixture(scope="module")
def tiny():
  corpus, queries = _tiny_data()
  return MatryoshkaIndex.build(corpus), queries


def test_plan_budget_picks_best_within_budget(tiny):
  index, queries = tiny
  grid = Grid(dims=(16, 32, 64), shortlists=(4,), deep_shortlists=(10,))
  plan = plan_lib.plan_budget(index, queries, k=5, bytes_per_vector=8, grid=grid, repeats=1)
  # An independent reference: the true top 5 by cosine, brute force in numpy
  # (the planner's own reference is the library's full-size search).
  corpus, _ = _tiny_data()
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  truth = np.argsort(-(unit(queries.astype(np.float64)) @ unit(corpus.astype(np.float64)).T),
                     axis=1)[:, :5]
  recall = lambda rows: np.mean([len(set(r) & set(t)) / 5 for r, t in zip(rows, truth)])
  assert plan.metric == "recall@5" and plan.full_quality == 1.0
  # Each candidate within the budget, searched again on a separately built index
  # with the same stores, scored against the numpy truth.
  stores = sorted({st for c in plan.candidates for st in plan_lib.stores_for(c.schedule)})
  check = MatryoshkaIndex.build(corpus, stores=stores)
  fits = [c for c in plan.candidates if c.memory_bytes <= 8]
  assert len(fits) >= 3
  measured = [recall(check.search_rows(queries, 5, schedule=c.schedule)[1]) for c in fits]
  for c, want in zip(fits, measured):
    assert c.quality == pytest.approx(want, abs=1e-12), c.schedule
  assert plan.chosen.memory_bytes <= 8 and plan.chosen.quality == max(measured)
  assert max(measured) < 1.0   # Else the budget would not have to trade anything.
  assert plan.choice in plan.frontier and index.stores == {}      # planned on a view
  # Everything in memory ("all"): 100 bytes rule out every float32 stage (64 * 4 + ...).
  strict = plan_lib.plan_budget(index, queries, k=5, bytes_per_vector=100, grid=grid, repeats=1,
                              convention="all")
  assert all(p != "float32" for _, _, p in strict.chosen.schedule)
  assert strict.chosen.stored_bytes <= 100
  with pytest.raises(adaptor.InputError, match="must allow at least one configuration.*got 1"):
    plan_lib.plan_budget(index, queries, k=5, bytes_per_vector=1, grid=grid)


def test_plan_with_qrels_config_round_trip_and_build(tiny, tmp_path):
  index, queries = tiny
  ids = [f"q{i}" for i in range(30)]
  qrels = {f"q{i}": {str(i): 1} for i in range(30)}
  plan = plan_lib.plan_budget(index, queries, k=5, qrels=qrels, query_ids=ids, quality=0.95,
                            grid=Grid(dims=(16, 64), shortlists=(4,), deep_shortlists=()),
                            repeats=1)
  assert plan.metric == "ndcg@5" and plan.chosen.relative >= 0.95
  assert plan.chosen.memory_bytes == min(c.memory_bytes for c in plan.candidates
                                         if c.relative >= 0.95)
  plan_lib.write_plan(plan, tmp_path / "plan.json")
  config = plan_lib.read_plan(tmp_path / "plan.json")
  assert config["schedule"] == [list(s) for s in plan.chosen.schedule]
  assert len(config["candidates"]) == len(plan.candidates)
  built = MatryoshkaIndex.build(index.vectors, stores=config["stores"], schedule=config["schedule"])
  assert built.schedule == plan.chosen.schedule
  _, rows = built.search_rows(queries, 5)
  assert np.mean(rows[:, 0] == np.arange(30)) > 0.9
  plan.plot(tmp_path / "f.png")
  assert (tmp_path / "f.png").stat().st_size > 1000
  (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(adaptor.InputError, match="expected a matryoshka-plan format_version 1"):
    plan_lib.read_plan(tmp_path / "bad.json")


def test_cli_plan_refuses_options_of_the_other_mode(tmp_path, capsys):
  from adaptor import cli
  out = ["--out", str(tmp_path / "p")]
  ix = ["--index", str(tmp_path / "ix"), "--queries", str(EMB / "queries.npy")]
  assert cli.main(["plan", *ix, "--quality", "0.9", "--corpus-size", "1000", *out]) == 2
  assert "--corpus-size: expected only with --recall, got with --quality 0.9" in capsys.readouterr().err
  assert cli.main(["plan", *ix, "--recall", "0.9", "--shortlists", "4", "--repeats", "2", *out]) == 2
  assert ("--shortlists, --repeats: expected only with the budget modes (--bytes-per-vector, "
          "--quality), got with --recall 0.9") in capsys.readouterr().err
  assert cli.main(["plan", *ix, "--checkpoint", "ck", "--recall", "0.9", *out]) == 2
  assert "from the saved index alone, got also --checkpoint" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["plan", *ix, "--recall", "1.5", *out])
  assert "expected a share in (0, 1] like 0.99, got '1.5'" in capsys.readouterr().err
  assert not (tmp_path / "p").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recall", "budget"])
def test_cli_plan_then_index_build_config(mode, tmp_path, capsys):
  """Either mode's plan.json builds an index whose stores and default schedule are the plan's."""
  from adaptor import cli
  out = tmp_path / "plan"
  corpus = ["--corpus", str(EMB / "corpus.npy"), "--corpus-ids", str(EMB / "corpus_ids.txt")]
  few = tmp_path / "few.npy"
  np.save(few, np.load(EMB / "queries.npy")[:100])
  if mode == "recall":   # From a saved index, costed for a million documents.
    assert cli.main(["index", "build", *corpus, "--out", str(tmp_path / "ix0")]) == 0
    argv = ["plan", "--index", str(tmp_path / "ix0"), "--queries", str(few), "--recall", "0.95",
            "--dims", "64,256", "--corpus-size", "1000000", "--out", str(out)]
    out.mkdir()   # What an earlier budget plan left: refused, then replaced entirely.
    (out / "frontier.png").write_bytes(b"old")
    assert cli.main(argv) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    argv.append("--overwrite")
  else:   # From the BEIR folder's corpus and train queries, nDCG@10 against their qrels.
    argv = ["plan", "--beir", str(DATA), "--model", "all-MiniLM-L6-v2", "--max-queries", "60",
            "--dims", "64,384", "--shortlists", "4", "--repeats", "1", "--out", str(out)]
    assert cli.main(argv + ["--bytes-per-vector", "1"]) == 2
    assert "must allow at least one configuration" in capsys.readouterr().err
    assert not out.exists()
    argv += ["--bytes-per-vector", "48"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert f"* chosen (--{'recall 0.95' if mode == 'recall' else 'bytes-per-vector 48'})" in printed
  assert "| * |" in printed
  config = json.loads((out / "plan.json").read_text())
  assert config["format"] == "matryoshka-plan" and config["d"] == 384 and config["k"] == 10
  assert len(config["schedule"]) > 1   # A funnel, not the full-size exact fallback.
  assert cli.main(["index", "build", *corpus, "--config", str(out / "plan.json"),
                   "--out", str(tmp_path / "ix")]) == 0
  built = MatryoshkaIndex.load(tmp_path / "ix")
  assert [list(st) for st in built.schedule] == config["schedule"]
  assert sorted(built.stores) == sorted((s["precision"], s["dims"]) for s in config["stores"])
  if mode == "recall":
    assert config["planner"] == "recall-target" and config["stores"] == []
    assert config["recall"] >= 0.95 and not (out / "frontier.png").exists()
    # The planned recall, found again by the built index's default search
    # against a numpy float64 full-size top 10.
    q = np.load(few)
    _, rows = built.search_rows(q, 10)
    truth = _brute_rows(q, np.load(EMB / "corpus.npy"), 10, 384)
    found = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    assert found == pytest.approx(config["recall"], abs=2e-3)   # Float32 near-ties may flip.
  else:
    assert config["planner"] == "budget" and config["metric"] == "ndcg@10"
    assert config["chosen"]["memory_bytes"] <= 48 and config["stores"]
    assert (out / "frontier.png").stat().st_size > 1000
    assert cli.main(["index", "search", "--index", str(tmp_path / "ix"), "--queries", str(few),
                     "--output", str(tmp_path / "run.tsv")]) == 0
    assert len((tmp_path / "run.tsv").read_text().splitlines()) == 1 + 100 * 10
    capsys.readouterr()
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((4, 8), np.float32))
    assert cli.main(["index", "build", "--corpus", str(wrong), "--config", str(out / "plan.json"),
                     "--out", str(tmp_path / "ix3")]) == 2
    assert "planned for d=384, got an index of d=8" in capsys.readouterr().err
