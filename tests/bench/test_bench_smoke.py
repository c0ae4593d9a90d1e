"""Every bench/ script, run as a user runs it but with --smoke (tiny sizes), so none can rot:
each still runs transferkit's real code path and its named peer on real SST-2 rows and the
real MiniLM, and writes its report. The figures of a smoke run mean nothing; what is asserted
is that both sides ran on the same rows and that the report says so.

Not in the default run (about 6 minutes; the peers need the `bench` extra): `pytest -m bench`,
which .ci/run runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# A smoke run takes seconds to a minute on an idle 2-core CPU; the limits only catch a hang,
# on a machine that may be shared.
pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]


def bench(script: str, *args: str, data: Path | None = None) -> str:
    """Run ``python bench/<script> ARGS`` from the repository root; its stdout."""
    env = dict(os.environ)
    if data is not None:
        env["TRANSFERKIT_BENCH_SST2"] = str(data / "sst2")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_common_reports_the_machine(tmp_path: Path) -> None:
    bench("common.py", "--smoke", "--out", str(tmp_path / "machine.json"))
    machine = report(tmp_path / "machine.json")["machine"]
    assert machine["cores"] == os.cpu_count()
    assert machine["torch"] == torch.__version__
    assert machine["bf16_matmul_tflops"] > 0


def test_extract_smoke(tmp_path: Path, shared_data: Path) -> None:
    out = bench("extract.py", "--smoke", "--out", str(tmp_path / "r.json"), data=shared_data)
    summary = report(tmp_path / "r.json")["summary"]
    assert summary["texts"] == 200 + 100  # train and validation carved from 200, dev 100
    assert summary["ours_per_s"] > 0
    assert summary["peer_per_s"] > 0
    # Same sentences, same model: our (bf16 where native) vectors match the fp32 peer's.
    assert summary["cosine_min"] >= 0.999
    assert 0.5 < summary["probe_accuracy_ours"] <= 1
    assert abs(summary["probe_accuracy_ours"] - summary["probe_accuracy_peer"]) <= 0.05
    assert "extraction: transferkit" in out
    assert "ratio" in out


def test_finetune_smoke(tmp_path: Path, shared_data: Path) -> None:
    bench("finetune.py", "--smoke", "--out", str(tmp_path / "r.json"), data=shared_data)
    result = report(tmp_path / "r.json")
    (run,) = result["repetitions"]
    ours, best, fp32 = run["transferkit"], run["Trainer bf16+grouped"], run["Trainer fp32"]
    assert ours["rows"] == best["rows"] == fp32["rows"] == result["rows"]["ingested"]["train"]
    assert ours["rows"] == 64
    # one epoch of 64 rows in batches of 32, on each side
    assert ours["steps"] == best["steps"] == fp32["steps"] == 2
    assert (best["precision"], fp32["precision"]) == ("bf16 autocast", "fp32")
    assert result["rows"]["ingested"]["test"] == 100
    for side in (ours, best, fp32):
        assert side["examples_per_second"] > 0
        assert 0 <= side["dev_accuracy"] <= 1
    assert result["medians"]["ratio_to_best_peer"] > 0
    assert result["medians"]["ratio_to_fp32_peer"] > 0


def test_pipeline_smoke(tmp_path: Path, shared_data: Path) -> None:
    bench("pipeline.py", "--smoke", "--out", str(tmp_path / "r.json"), data=shared_data)
    result = report(tmp_path / "r.json")
    (rep,) = result["repetitions"]
    # The plain process and KFP's local runner ran the same steps on the same rows ...
    assert rep["plain_metric"] == pytest.approx(rep["kfp_metric"], abs=0.02)
    assert rep["kfp_rerun_metric"] == rep["kfp_metric"]
    # ... and the identical rerun was served from KFP's cache.
    assert rep["rerun_cache_ok"] is True
    assert result["ratio_kfp_over_plain"] > 0


def test_probe_smoke(tmp_path: Path) -> None:
    out = bench("probe.py", "--smoke", "--out", str(tmp_path / "r.json"))
    summary = report(tmp_path / "r.json")["summary"]
    assert set(summary["seconds"]) == {"transferkit", "scikit-learn"}
    for side in summary["seconds"].values():
        assert 0 < side["min"] <= side["median"] <= side["max"]
    # The same objective on the same rows: both choose a penalty and score alike.
    accuracy = summary["test_accuracy"]
    assert accuracy["transferkit"] > 0.5
    assert abs(accuracy["transferkit"] - accuracy["scikit-learn"]) <= 0.05
    assert "probe: transferkit" in out
    assert "ratio" in out


def test_stsb_smoke(tmp_path: Path) -> None:
    out = bench("stsb.py", "--smoke", "--out", str(tmp_path / "r.json"))
    result = report(tmp_path / "r.json")
    assert result["pairs"] == {"train": 200, "validation": 100, "test": 100}
    ours, theirs = result["results"]["transferkit"], result["results"]["sentence-transformers"]
    # The same encoder on the same pairs: the same cosines, so the same zero-shot ranking;
    # the same ridge grid on the same features: close test figures.
    assert abs(ours["zero_shot_spearman"] - theirs["zero_shot_spearman"]) < 0.005
    assert ours["zero_shot_spearman"] > 0.5
    assert abs(ours["ridge_spearman"] - theirs["ridge_spearman"]) < 0.05
    assert "embed both texts: transferkit" in out
    assert "ratio" in out


def test_stsb_finetune_smoke(tmp_path: Path) -> None:
    out = bench("stsb_finetune.py", "--smoke", "--out", str(tmp_path / "r.json"))
    result = report(tmp_path / "r.json")
    pairs = {"train": 200, "validation": 100, "test": 100}
    assert result["pairs"] == {"source": pairs, "ingested": pairs}
    assert result["recipe"]["epochs"] == 1
    assert set(result["results"]) == {"cross", "bi"}
    for variant in result["results"].values():
        # Both sides ran and were scored; which wins, and how fast, a smoke run cannot say.
        for side in (variant["transferkit"], variant["sentence-transformers"]):
            assert side["train_seconds"] > 0
            assert math.isfinite(side["test_spearman"])
            assert -1 <= side["test_spearman"] <= 1
        assert variant["ratio_train_seconds"] > 0
    for what in ("cross-encoder", "bi-encoder"):
        assert f"{what}, train: transferkit" in out
        assert f"{what}, test Spearman x 100: transferkit" in out


def test_scale_smoke(tmp_path: Path) -> None:
    bench("scale.py", "--smoke", "--out", str(tmp_path / "r.json"))
    result = report(tmp_path / "r.json")
    assert [run["rows"] for run in result["runs"]] == [100, 1000]
    for run in result["runs"]:
        assert run["texts_per_second"] > 0
        assert run["extract_features"]["peak_rss_mib"] > 0
    assert result["size_ratio"] == 10


def test_generate_rows_is_seeded_and_labelled(tmp_path: Path) -> None:
    for name in ("a.tsv", "b.tsv"):
        bench("generate_rows.py", "1000", str(tmp_path / name))
    lines = (tmp_path / "a.tsv").read_text().splitlines()
    assert (tmp_path / "b.tsv").read_bytes() == (tmp_path / "a.tsv").read_bytes()
    assert lines[0] == "sentence\tlabel"
    assert len(lines) == 1001
    labels = [line.rsplit("\t", 1)[1] for line in lines[1:]]
    assert set(labels) == {"0", "1"}
    assert all(2 <= len(line.split("\t")[0].split()) <= 52 for line in lines[1:])


def test_gpu_check_smoke(tmp_path: Path, shared_data: Path) -> None:
    out = bench(
        "gpu_check.py",
        "--smoke",
        "--data",
        str(shared_data / "sst2"),
        "--out",
        str(tmp_path / "check"),
    )
    result = report(tmp_path / "check" / "gpu_check.json")
    if not torch.cuda.is_available():
        assert "no CUDA device: running on the CPU; no GPU figure is measured" in out
        assert result["device"] == "cpu"
    (extract,) = result["extract"]
    assert extract["rows"] == {"train": 190, "validation": 10, "test": 100}  # 5 % validation
    assert extract["texts_per_second"] > 0
    assert result["peer_extract"]["texts_per_second"] > 0
    (run,) = result["runs"]
    assert run["epochs"] == 1
    assert run["batch_size"] == 16
    assert 0 <= run["dev_accuracy"] <= 1
