"""`robustkit bench latency` runs and reports sane figures (a benchmark: nothing here is timed)."""

from __future__ import annotations

import json

from robustkit.cli import main


def test_latency_bench_writes_figures(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", "tiny_cnn.init", "--batch-sizes", "1,8", "--repeats", "2",
                 "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch_size"] for r in report["runs"]] == [1, 8]
    for r in report["runs"]:
        assert r["calls"] >= 2 and r["per_image_ms"] > 0
        assert abs(r["per_image_ms"] * r["batch_size"] - r["median_call_ms"]) < 1e-6
    assert report["parameters"] > 0 and report["input_shape"] == [3, 32, 32]
    assert "ms/image" in capsys.readouterr().out


def test_latency_bench_bad_input(capsys):
    assert main(["bench", "latency", "--model", "tiny_cnn.init", "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
