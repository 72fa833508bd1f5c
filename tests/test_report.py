"""The report files: report.json, kernel.safetensors and a self-contained report.html that
embeds every figure as a PNG and is titled with the model and the data."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch
from models import roberta_classifier, token_batch
from safetensors.torch import load_file

from linft.cli import report as report_module
from linft.cli.analysis import Task, analyze

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("spectrum", "layers", "loss", "accuracy")


def _result(labelled: bool, ridge: float = 0.0):
    model = roberta_classifier(num_labels=2)
    lengths = torch.randint(2, 9, (11,)).tolist()
    lengths[0], lengths[-1] = 9, 3  # one full row, one padded
    batch = token_batch(lengths)
    labels = torch.arange(11) % 2 if labelled else None
    train, test = (torch.arange(8), torch.arange(8, 11)) if labelled else (None, None)
    task = Task(model, batch, None, "trainable", labels, ["0", "1"], train, test)
    result = analyze(task, ridge=ridge, steps=30, progress=False)
    result.report.update(model="models/tiny-roberta", data="data/reviews.tsv")
    return result


@pytest.mark.parametrize("labelled", [True, False])
def test_report_files_and_every_figure_in_the_html(tmp_path, labelled):
    result = _result(labelled)
    written = report_module.write_outputs(result, tmp_path)
    assert [p.name for p in written] == ["report.json", "kernel.safetensors", "report.html"]
    report = json.loads((tmp_path / "report.json").read_text())  # plain JSON, no Infinity
    assert report["kernel_shape"] == [11, 2, 11, 2]
    tensors = load_file(str(tmp_path / "kernel.safetensors"))
    assert torch.equal(tensors["kernel"], result.tensors["kernel"])
    assert ("kernel_signgd" in tensors) == labelled
    page = (tmp_path / "report.html").read_text()
    assert "<title>linft: models/tiny-roberta on data/reviews.tsv</title>" in page
    assert 'src="http' not in page and "<link" not in page  # self-contained
    images = dict(
        re.findall(r'<img id="(\w+)" alt="\w+" src="data:image/png;base64,([^"]+)"', page)
    )
    expected = FIGURES if labelled else FIGURES[:2]
    assert sorted(images) == sorted(expected)
    for name, data in images.items():
        png = base64.b64decode(data)
        assert png.startswith(PNG) and len(png) > 5000, name
    # the printed summary is in the page too
    assert "top eigenvalues" in page and ("held-out accuracy" in page) == labelled


def test_infinite_condition_numbers_are_written_and_drawn(tmp_path):
    result = _result(True)
    # a module whose kernel is singular: its own condition number is infinite
    report = result.report
    name = next(iter(report["layers"]))
    report["layers"][name]["condition_number"] = "inf"
    report["spectrum"]["condition_number"] = math.inf
    report_module.write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["spectrum"]["condition_number"] == (
        "inf"
    )
    assert "condition number: inf" in (tmp_path / "report.html").read_text()


def test_without_matplotlib_the_page_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module.plots, "available", lambda: False)
    report_module.write_outputs(_result(True), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<img" not in page and "install matplotlib" in page
