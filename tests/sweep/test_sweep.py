"""The sweep end to end on the runlocal config (tiny random CLIP, mock data): a 2 methods x 2
datasets x 2 shots x 2 seeds few-shot grid run in process (as processes each cell would pay ~10 s
of imports), stopped by Ctrl-C after 3 cells and resumed; its tables read back
against the store; the plots; and the submitit path on submitit's local executor (one cell)."""

import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from clip_lora_jax.sweep import __main__ as cli
from clip_lora_jax.sweep import plots, protocols, report, runner, store, tables

from conftest import ROOT

RUNLOCAL = os.path.join(ROOT, "configs", "runlocal.py")
# 2 methods x 2 datasets x 2 shots x 2 seeds (a cell costs a few seconds in process on 2 cores:
# tf.data pipelines, features, evaluation).
GRID = dict(method_names=["zero_shot", "llu"], datasets=["eurosat", "dtd"], shots=[1, 2],
            seeds=[1, 2])


def settings(root, cache):
  return runner.Settings(str(root), RUNLOCAL, (f"cache_dir={cache}",))


def parse_markdown(text):
  """Rows of a Markdown table as lists of cells, marks removed."""
  rows = [[c.strip().strip("*").replace("<u>", "").replace("</u>", "") for c in line.split("|")[1:-1]]
          for line in text.splitlines() if line.startswith("|")]
  return rows[0], rows[2:]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """The grid stopped by Ctrl-C after 3 cells, then run again: (root, cells run the second
  time, records)."""
  root = tmp_path_factory.mktemp("sweep") / "paper"
  cache = tmp_path_factory.mktemp("cache")
  cells = protocols.grid("fewshot", **GRID)
  ran = []
  original = runner.execute_in_process

  def stop_after_three(s, item):
    if len(ran) == 3:
      raise KeyboardInterrupt
    ran.append(item.cell.key)
    return original(s, item)

  runner.execute_in_process = stop_after_three
  try:
    with pytest.raises(KeyboardInterrupt):
      runner.run(cells, settings(root, cache), "inprocess")
  finally:
    runner.execute_in_process = original
  assert len(store.read(str(root))) == 3
  first = report.write(str(root))
  tables_before = open(root / "tables" / "table2.md").read()
  again = []

  def counting(s, item):
    again.append(item.cell.key)
    return original(s, item)

  runner.execute_in_process = counting
  try:
    records = runner.run(cells, settings(root, cache), "inprocess")
  finally:
    runner.execute_in_process = original
  assert first and tables_before
  return root, ran, again, records


def test_the_resumed_sweep_runs_only_the_missing_cells(swept, monkeypatch):
  root, ran, again, records = swept
  assert len(records) == 16 and all(r["status"] == store.DONE for r in records.values())
  assert sorted(ran + again) == sorted(records) and not set(ran) & set(again)
  for r in records.values():
    assert r["wall_s"] > 0 and r["peak_rss_mb"] > 0 and "train.py --config" in r["command"]
    result = json.load(open(r["output"]))
    assert r["top1"] == result["test_top1"] and r["count"] == result["test_count"]
  progress = json.load(open(root / store.PROGRESS_FILE))
  assert progress["done"] == 16 and progress["failed"] == 0 and progress["running"] == 0
  # A third run runs nothing and leaves the tables as they are.
  before = tables.markdown(tables.table2(list(store.read(str(root)).values())))
  monkeypatch.setattr(runner, "execute_in_process", None)  # would fail if called
  runner.run(protocols.grid("fewshot", **GRID), settings(root, "unused"), "inprocess")
  assert tables.markdown(tables.table2(list(store.read(str(root)).values()))) == before


def test_table2_numbers_are_the_stored_results(swept):
  root, _, _, records = swept
  report.write(str(root))
  header, rows = parse_markdown(open(root / "tables" / "table2.md").read())
  assert header == ["Shots", "Method", "EuroSAT", "DTD", "Average"]
  assert [r[:2] for r in rows] == [["1", "zero_shot"], ["1", "llu"], ["2", "zero_shot"],
                                   ["2", "llu"]]
  for shots, method, *cells in rows:
    stored = [np.mean([r["top1"] for r in records.values()
                       if (r["method"], r["dataset"], r["shots"]) == (method, d, int(shots))])
              for d in ("eurosat", "dtd")]
    assert [float(c) for c in cells] == pytest.approx([*stored, sum(stored) / 2], abs=0.051)
  tex = open(root / "tables" / "table2.tex").read()
  assert "\\textbf{" in tex and "\\begin{tabular}{llccc}" in tex


def test_table2_mean_and_std_over_seeds():
  records = [{"kind": "train", "status": store.DONE, "method": "m", "train_dataset": d,
              "dataset": d, "shots": 4, "seed": seed, "top1": v}
             for d, seed, v in (("dtd", 1, 50.0), ("dtd", 2, 60.0), ("eurosat", 1, 70.0),
                                ("eurosat", 2, 90.0))]
  _, rows = parse_markdown(tables.markdown(tables.table2(records), std=True, decimals=3))
  sd = lambda a, b: abs(a - b) / 2 ** 0.5
  assert rows == [["4", "m", f"80.000 ± {sd(70, 90):.3f}", f"55.000 ± {sd(50, 60):.3f}",
                   f"67.500 ± {sd(60, 75):.3f}"]]


def test_plots_render_a_line_per_method(swept):
  root, _, _, _ = swept
  paths = plots.write(str(root))
  assert {os.path.basename(p) for p in paths} == {
      f"accuracy_vs_shots_{n}.{s}" for n in ("eurosat", "dtd", "average") for s in ("png", "svg")}
  for path in paths:
    assert os.path.getsize(path) > 5000
  svg = ET.parse(os.path.join(root, "plots", "accuracy_vs_shots_eurosat.svg"))
  ids = [e.get("id") for e in svg.iter()
         if (e.get("id") or "").startswith(("method-", "published-", "band-"))]
  # A line and a band over the seeds per method; zero_shot has a published (0-shot) number.
  assert sorted(ids) == ["band-llu", "band-zero_shot", "method-llu", "method-zero_shot",
                         "published-zero_shot"]


def test_markdown_marks_best_and_second_per_shots_group():
  records = [{"kind": "train", "status": store.DONE, "method": m, "train_dataset": "dtd",
              "dataset": "dtd", "shots": 1, "seed": 1, "top1": v}
             for m, v in (("a", 50.0), ("b", 70.0), ("c", 60.0))]
  _, rows = parse_markdown(tables.markdown(tables.table2(records)))
  text = tables.markdown(tables.table2(records))
  assert "**70.0**" in text and "<u>60.0</u>" in text and "| 50.0 |" in text
  assert [r[1] for r in rows] == ["a", "b", "c"]


def test_base_to_novel_table_average_is_h_of_mean_base_and_novel():
  def record(method, dataset, target, top1):
    return {"kind": "eval" if target else "train", "status": store.DONE, "method": method,
            "train_dataset": f"{dataset}/base", "dataset": f"{dataset}/{target or 'base'}",
            "shots": 16, "seed": 1, "top1": top1}
  records = [record("m", "dtd", None, 80.0), record("m", "dtd", "novel", 60.0),
             record("m", "eurosat", None, 90.0), record("m", "eurosat", "novel", 40.0)]
  header, rows = parse_markdown(tables.markdown(tables.base_to_novel(records), decimals=3))
  assert header == ["Dataset", "Method", "Base", "Novel", "H"]
  assert rows[0][2:] == ["90.000", "40.000", f"{2 * 90 * 40 / 130:.3f}"]
  assert rows[-1][:2] == ["Average", "m"]
  assert rows[-1][2:] == ["85.000", "50.000", f"{2 * 85 * 50 / 135:.3f}"]


def test_not_applicable_and_failed_cells_are_reported_not_fatal(tmp_path, monkeypatch):
  cells = [protocols.Cell("m", "eurosat/base", 1, 1),
           protocols.Cell("m", "eurosat/base", 1, 1, "eurosat/novel"),
           protocols.Cell("zero_shot", "eurosat/base", 1, 1, "eurosat/novel")]
  monkeypatch.setattr(protocols, "class_specific", lambda method: method == "m")
  calls = []

  def failing(s, item):
    calls.append(item.cell.key)
    os.makedirs(os.path.dirname(item.log), exist_ok=True)
    with open(item.log, "w") as f:
      f.write("boom")
    return {"returncode": 1, "wall_s": 0.1, "peak_rss_mb": 1.0}

  monkeypatch.setattr(runner, "execute_in_process", failing)
  monkeypatch.setattr(runner, "config_args", lambda s, c: ["--config", "x"])
  records = runner.run(cells, runner.Settings(str(tmp_path)), "inprocess")
  assert calls == [cells[0].key, cells[0].key]  # retried once; the evaluations never ran
  assert records[cells[0].key]["status"] == store.FAILED
  assert records[cells[0].key]["log"].endswith(".log") and records[cells[0].key]["attempts"] == 2
  assert records[cells[1].key]["status"] == store.NOT_APPLICABLE
  assert records[cells[2].key]["status"] == store.FAILED
  assert "did not finish" in records[cells[2].key]["reason"]


def test_cli_names_and_dry_run(tmp_path, capsys):
  assert cli.main(["--methods", "clip_lora", "--datasets", "dtd", "--shots", "1", "--seeds", "3",
                   "--root", str(tmp_path), "--dry_run"]) == 0
  (line,) = capsys.readouterr().out.splitlines()
  assert re.search(r"train.py --config \S+configs/fewshot.py:dataset=dtd,shots=1,seed=3 ", line)
  with pytest.raises(Exception, match="--methods 'lora_plus': unknown lora_plus"):
    cli.main(["--methods", "lora_plus", "--root", str(tmp_path)])
  assert cli.submitit_parameters(["partition=gpu", "timeout_min=60"], "slurm") == {
      "gpus_per_node": 1, "slurm_partition": "gpu", "timeout_min": 60}


def test_split_files_and_published_shot_lists_reach_each_cell(tmp_path, capsys):
  splits = tmp_path / "splits"
  splits.mkdir()
  args = ["--methods", "lora", "--protocol", "base_to_novel", "--datasets", "dtd,food101",
          "--shots", "16", "--seeds", "2", "--root", str(tmp_path / "root"), "--dry_run",
          "--split_files", str(splits)]
  with pytest.raises(Exception, match="no split_zhou_DescribableTextures.json there"):
    cli.main(args)
  (splits / "split_zhou_DescribableTextures.json").write_text("{}")
  assert cli.main(args + ["--shot_lists", "/coop/{dataset}/split_fewshot"]) == 0
  lines = capsys.readouterr().out.splitlines()
  (dtd_train,) = [line for line in lines if "train.py" in line and "dtd/base" in line]
  (dtd_novel,) = [line for line in lines if "eval.py" in line and "dtd/novel" in line]
  for line in (dtd_train, dtd_novel):
    assert f"--config.split_file={splits}/split_zhou_DescribableTextures.json" in line
  assert "--config.shot_lists=/coop/dtd/split_fewshot " in dtd_train  # the full dataset's draw
  assert "shot_lists" not in dtd_novel
  food = [line for line in lines if "food101" in line]
  assert len(food) == 2 and not any("--config.split_file=" in line for line in food)  # no names


def test_submitit_local_executor_runs_a_cell(tmp_path):
  cell = protocols.Cell("zero_shot", "eurosat", 1, 1)
  records = runner.run([cell], settings(tmp_path / "root", tmp_path / "cache"), "submitit",
                       cluster="local", parameters={"timeout_min": 10})
  record = records[cell.key]
  assert record["status"] == store.DONE, open(record["log"]).read()[-2000:]
  assert record["peak_rss_mb"] > 0 and 0 <= record["top1"] <= 100
  assert record["peak_device_memory_mb"] is None  # CPU: no accelerator to report
  assert os.listdir(tmp_path / "root" / "submitit")
