"""Tolerance profiles: every shipped file loads and says where its numbers come from; a broken
profile is rejected with every problem in one message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlmexport.bundle.manifest import VARIANTS
from vlmexport.cli import main
from vlmexport.errors import UsageError
from vlmexport.validate.profiles import PROFILE_DIR, load_profile, merge_bounds, profile_named, profile_names

SHIPPED = sorted(PROFILE_DIR.glob("*.toml"))
BOUND_LINE = re.compile(r"^\s*[a-z_0-9]+\s*=\s*[-+0-9.e]+")


def test_there_is_one_profile_per_variant() -> None:
    assert set(profile_names()) == set(VARIANTS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_profile_loads_and_every_bound_has_a_comment(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem and profile.description
    assert profile.logits.top1 is not None and profile.logits.top1_margin is not None
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if BOUND_LINE.match(line):
            # The measurement behind a number sits on its line or in the comment block just above.
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"{path.name}:{i + 1} has no comment: {line}"


def test_fp32_is_strict_has_merge_bounds_and_int8_keeps_the_agreed_floors() -> None:
    fp32 = profile_named("fp32")
    for bounds in (fp32.vision_encoder, fp32.projection, fp32.logits, fp32.present):
        # Relative to the tensor's RMS: the weakest injected fault measured 0.0078 (fp32.toml).
        assert bounds.rel_max <= 3e-3 and bounds.rel_mean <= bounds.rel_max and bounds.cosine >= 0.999999
    assert fp32.logits.top1 == 1.0 and fp32.end_to_end.caption_match == 1.0 and fp32.end_to_end.teacher_forced_top1 == 1.0
    assert fp32.merge is not None and fp32.merge.top1 == 1.0 and fp32.merge.rel_max <= 1e-3
    assert merge_bounds(profile_named("int8")) == fp32.merge  # a profile without [merge] uses fp32's
    int8 = profile_named("int8")
    assert int8.vision_encoder.cosine >= 0.99
    assert int8.end_to_end.teacher_forced_top1 >= 0.95 and int8.end_to_end.caption_match >= 0.9


def test_every_problem_in_a_profile_is_reported_at_once(tmp_path: Path) -> None:
    text = (PROFILE_DIR / "fp32.toml").read_text()
    text = re.sub(r"(?m)^cosine = .*$", "cosine = 1.5", text, count=1)  # out of range
    text = re.sub(r"(?m)^top1_margin = .*$", "", text, count=1)  # missing (the [logits] one)
    text = text.replace("[present]", "[present]\nmaxabs = 1", 1)  # unknown key
    text = text.replace("[merge]", "[merge]\nslack = 1", 1)  # unknown key in the optional section
    text = re.sub(r"(?m)^caption_match = .*$", 'caption_match = "all"', text)  # not a number
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert "5 problem(s)" in message
    for part in (
        "cosine = 1.5 must be between",
        "[logits] top1_margin is missing",
        "unknown key 'maxabs'",
        "caption_match = 'all' must be a number",
        "[merge] unknown key 'slack'",
    ):
        assert part in message


def test_a_mean_bound_above_its_max_bound_is_rejected(tmp_path: Path) -> None:
    text = (PROFILE_DIR / "fp32.toml").read_text()
    start = text.index("[projection]")
    end = text.index("[", start + 1)
    path = tmp_path / "odd.toml"
    path.write_text(text[:start] + re.sub(r"(?m)^rel_mean = \S+", "rel_mean = 1.0", text[start:end]) + text[end:])
    with pytest.raises(UsageError, match=r"\[projection\] rel_mean = 1.0 exceeds rel_max"):
        load_profile(path)


def test_a_kl_goal_is_optional_checked_and_never_looser_than_the_bound(tmp_path: Path) -> None:
    int8, fp32 = profile_named("int8"), profile_named("fp32")
    assert fp32.end_to_end.target_kl is None  # optional: most profiles' bound is their goal
    assert int8.end_to_end.target_kl is not None and int8.end_to_end.target_kl < int8.end_to_end.teacher_forced_kl
    # Issue #12's goals, whether a profile judges its goal (fp16) or reports it beside a parity bound.
    goals = {mode: profile_named(mode).end_to_end.goal_kl for mode in ("int8", "uint8", "fp16", "q4")}
    assert goals == {"int8": 0.01, "uint8": 0.01, "fp16": 0.001, "q4": 0.1}
    assert fp32.end_to_end.goal_kl == fp32.end_to_end.teacher_forced_kl
    text = (PROFILE_DIR / "int8.toml").read_text()
    for value, problem in (("0.5", "target_kl = 0.5 exceeds teacher_forced_kl"), ('"low"', "target_kl = 'low' must be a number")):
        path = tmp_path / "goal.toml"
        path.write_text(re.sub(r"(?m)^target_kl = .*$", f"target_kl = {value}", text))
        with pytest.raises(UsageError, match=re.escape(problem)):
            load_profile(path)


def test_a_profile_file_that_is_not_toml_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("description = 'x'\n[vision_encoder\n")
    code = main(["check", "--onnx-dir", str(tmp_path), "--variant", "int8", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "not valid TOML" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_profile_name_lists_the_shipped_ones() -> None:
    with pytest.raises(UsageError, match="fp32.*int8"):
        profile_named("int3")
