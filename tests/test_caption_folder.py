"""`vlmexport caption --images DIR --output captions.jsonl`: every image captioned as the runtime
captions it, one JSON line each; a rerun resumes (cut lines and failures retried, nothing twice);
bad images are reported without stopping the others; worker processes give the same lines."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.cli import main
from vlmexport.errors import UsageError
from vlmexport.exporter.export import export_bundle
from vlmexport.runtime import Captioner
from vlmexport.runtime.batch import caption_folder, resume
from vlmexport.samples import sample_images


@pytest.fixture(scope="module")
def bundle(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("folder") / "onnx"
    export_bundle(make_checkpoint("serve"), out, layout="distilvit", verify=False)
    return out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    for i, image in enumerate(sample_images(5, 48, seed=11)):
        image.save(root / ("trip" if i >= 3 else "") / f"{i}.png")
    sample_images(1, 48, seed=1)[0].save(root / ".thumbs" / "hidden.png")
    (root / "notes.txt").write_text("not an image, and not named like one")
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_is_captioned_like_the_runtime_one_line_per_image(bundle: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    progress: list[tuple[int, int]] = []
    report = caption_folder(bundle, folder, out, workers=1, batch_size=2, on_progress=lambda done, total: progress.append((done, total)))
    names = ["0.png", "1.png", "2.png", "trip/3.png", "trip/4.png"]
    expected = Captioner(bundle).caption([folder / n for n in names])
    assert {line["image"]: line["caption"] for line in lines(out)} == dict(zip(names, expected))
    assert report.captioned == 5 and report.skipped == 0 and not report.failures
    assert progress[0] == (0, 5) and progress[-1] == (5, 5) and len(progress) == 4  # one update per batch


def test_a_rerun_resumes_skipping_what_is_done_and_retrying_cut_lines_and_failures(bundle: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    first = caption_folder(bundle, folder, out, workers=1)
    assert first.captioned == 5 and [image for image, _ in first.failures] == ["broken.png"]
    assert next(line for line in lines(out) if line["image"] == "broken.png")["error"].startswith(str(folder / "broken.png"))
    # An interruption: the last line cut halfway. The broken image is fixed meanwhile.
    text = out.read_text()
    out.write_text(text[: text.rindex('{"image"')] + '{"image": "trip/4.pn')
    shutil.copy(folder / "0.png", folder / "broken.png")
    done_before = resume(out)
    assert "broken.png" not in done_before and len(done_before) == 4  # the cut line and the failure dropped
    second = caption_folder(bundle, folder, out, workers=2, batch_size=1)  # two worker processes finish the job
    assert second.skipped == 4 and second.captioned == 2 and not second.failures and second.workers == 2
    final = lines(out)
    assert sorted(line["image"] for line in final) == ["0.png", "1.png", "2.png", "broken.png", "trip/3.png", "trip/4.png"]
    by_image = {line["image"]: line["caption"] for line in final}
    assert by_image["broken.png"] == by_image["0.png"]
    assert caption_folder(bundle, folder, out, workers=2).captioned == 0  # nothing left: no worker started
    assert {(line["variant"], json.dumps(line["decoding"])) for line in final} == {("fp32", "{}")}


def test_a_rerun_with_other_decoding_is_refused_and_lines_without_a_record_are_kept(bundle: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    caption_folder(bundle, folder, out, workers=1, options=DecodeOptions(num_beams=2, max_new_tokens=4))
    assert {json.dumps(line["decoding"], sort_keys=True) for line in lines(out)} == {'{"max_new_tokens": 4, "num_beams": 2}'}
    before = out.read_text()
    with pytest.raises(UsageError, match=r"line 1 was captioned with variant fp32 \(max_new_tokens=4, num_beams=2\), this run asks for variant fp32 \(greedy defaults\)"):
        caption_folder(bundle, folder, out, workers=1)
    assert out.read_text() == before  # refused before anything was rewritten
    # An earlier version's lines carry no record: taken as they are.
    out.write_text("".join(json.dumps({k: v for k, v in line.items() if k not in ("variant", "decoding")}) + "\n" for line in lines(out)))
    assert caption_folder(bundle, folder, out, workers=1).skipped == 5


def test_folder_errors_are_one_line_with_exit_2(bundle: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        caption_folder(bundle, tmp_path / "empty", tmp_path / "x.jsonl")
    (tmp_path / "foreign.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(UsageError, match="line 1 is not a line this command writes"):
        caption_folder(bundle, folder, tmp_path / "foreign.jsonl")
    for argv in (
        ["caption", "--onnx-dir", str(bundle), "--images", str(folder)],
        ["caption", "--onnx-dir", str(bundle), "--images", str(folder), "--output", str(tmp_path / "c.jsonl"), str(folder / "0.png")],
        ["caption", "--onnx-dir", str(bundle), "--images", str(tmp_path / "missing"), "--output", str(tmp_path / "c.jsonl")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
    (folder / "bad.png").write_text("not an image")
    assert main(["caption", "--onnx-dir", str(bundle), "--images", str(folder), "--output", str(tmp_path / "c.jsonl"), "--workers", "1"]) == 2
    captured = capsys.readouterr()
    assert "5 captioned, 0 already in" in captured.out and "1 image(s) could not be captioned" in captured.err
