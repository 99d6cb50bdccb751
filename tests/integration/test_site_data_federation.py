"""`fedq run` on per-site data files, as three sites with their own npz files would run it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.cli import main
from shared.datasets import load_dataset, partition, tensors_of


@pytest.mark.timeout(240)
def test_an_embedded_run_trains_three_sites_each_on_its_own_npz_file_of_the_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = tensors_of(load_dataset("digits", "train"))
    sites = []
    for i, index in enumerate(partition(y.numpy(), 3, "dirichlet:0.5", seed=0)):
        path = tmp_path / f"site-{i}.npz"
        np.savez(path, x=x[index].numpy(), y=y[index].numpy())
        sites.append(str(path))
    out = tmp_path / "run"

    argv = ["run", "--data", ",".join(sites), "--dataset", "digits", "--model", "mlp"]
    argv += ["--strategy", "fedavg", "--max-versions", "3", "--name", "sites"]
    code = main([*argv, "--out", str(out), "--quiet"])

    assert code == 0
    assert "3 workers" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job_id"].startswith("sites-")
    assert summary["versions"] == 3
    assert summary["workers"] == ["w0", "w1", "w2"]
    assert summary["updates_rejected"] == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # Every FedAvg round folds one update from each site.
    assert [h["updates"] for h in history[1:]] == [3, 3, 3]
    assert summary["final_accuracy"] > history[0]["accuracy"]
