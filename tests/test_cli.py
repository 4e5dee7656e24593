"""The command line: list, run (JSON record) and bench-cost on tiny models."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import mmpress
from mmpress.cli import app
from conftest import samples, tiny_llava, tiny_processor

runner = CliRunner()  # click >= 8.2 keeps stderr (weight-loading bars) out of result.stdout


def test_list_shows_every_press():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name in mmpress.list_presses():
        assert name in result.output


def test_run_prints_a_json_record(tmp_path):
    model_dir, image = tmp_path / "tiny", tmp_path / "a.png"
    tiny_llava().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    samples(1)[0]["image"].save(image)
    result = runner.invoke(app, ["run", "--model", str(model_dir), "--press", "divprune", "--keep", "16",
                                 "--image", str(image), "--json", "--max-new-tokens", "2", "what color is the square?"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["kept_tokens"] == 16 and record["total_tokens"] == 64
    assert record["prefill_seconds"] > 0 and 0 < record["flops_saved"] < 1


def test_run_rejects_unknown_press_and_missing_image(tmp_path):
    assert runner.invoke(app, ["run", "--image", str(tmp_path / "missing.png"), "q"]).exit_code != 0
    result = runner.invoke(app, ["run", "--press", "nope", "--image", str(tmp_path), "q"])
    assert result.exit_code != 0


def test_bench_cost_on_a_small_shape(tmp_path):
    out = tmp_path / "rows.json"
    result = runner.invoke(app, ["bench-cost", "--presses", "random,divprune", "--keeps", "64,16", "--repeats", "1",
                                 "--lm-layers", "1", "--lm-hidden", "64", "--lm-intermediate", "128", "--lm-heads", "2",
                                 "--vision-layers", "1", "--vision-hidden", "64", "--image-size", "112",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["press"], r["keep"]) for r in rows] == [("none", 64), ("random", 16), ("divprune", 16)]
    assert all(r["limit"] > 1 for r in rows[1:])
