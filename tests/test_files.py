"""Atomic result files: two writers of one file at once both succeed (nnUNetv2_adv_evaluate's
-num_parts parts started together both record the report's settings)."""
import os
import stat

import nnunet_adv.files as files


def test_a_second_writer_between_write_and_rename_does_not_break_the_first(tmp_path, monkeypatch):
    target = tmp_path / "evaluation.json"
    real_replace = os.replace
    interleaved = []

    def replace_after_another_writer(src, dst):
        # the other part writes the same file while this one is between its write and its rename
        if not interleaved:
            interleaved.append(True)
            files.atomic_write_text(target, "second")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_after_another_writer)
    files.atomic_write_text(target, "first")
    assert target.read_text() == "first"  # the last rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]  # no temporary file left


def test_a_failed_write_leaves_neither_a_temporary_file_nor_a_changed_target(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_space)
    try:
        files.atomic_write_json(target, {"a": 1})
    except OSError:
        pass
    else:
        raise AssertionError("the OSError must reach the caller")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_result_file_gets_the_usual_mode_not_mkstemps_0600(tmp_path):
    target = tmp_path / "report.md"
    files.atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
