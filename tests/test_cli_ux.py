"""The command line explains itself: help and defaults on every option of every command, preset
lists from the presets that exist, one naming scheme for output flags, results on stdout, no
silent multi-day default, a failed start that leaves no folder behind; own crops end to end; and
every hint in an error followed by a test that sees the problem go away."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest

from isereid.cli import HelpFormatter, build_parser, main
from isereid.presets import preset_names

QUICK = ["optim.epochs=1", "optim.iters=2", "data.workers=0", "train.progress=false", "train.tensorboard=false",
         "data.batch_size=16", "model.bn_chunk=16", "eval.every=0"]


def all_parsers(parser: argparse.ArgumentParser, prefix: str = "isereid"):
    """(name, parser) of the parser and every sub-command, at any depth (new commands included)."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{prefix} {name}")


def test_every_option_of_every_command_has_help_and_shows_its_default():
    parsers = list(all_parsers(build_parser()))
    assert {"isereid train", "isereid test", "isereid weights import"} <= {name for name, _ in parsers}
    for name, parser in parsers:
        formatter = HelpFormatter(name)
        parser.format_help()  # renders (a bad %-format would raise here)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{what} has no help"
            default = action.default
            if default is not None and default is not False and action.option_strings:
                assert "%(default)" in formatter._get_help_string(action), f"{what} hides its default {default!r}"


def test_help_lists_the_presets_that_exist_and_fitting_examples(capsys):
    parsers = dict(all_parsers(build_parser()))
    for command in ("isereid train", "isereid test"):
        config = next(a for a in parsers[command]._actions if a.dest == "config")
        assert all(name in config.help for name in preset_names()) and "cpu" in config.help
    overrides = next(a for a in parsers["isereid test"]._actions if a.dest == "overrides")
    assert "optim." not in overrides.help  # test does not train: no training example
    with pytest.raises(SystemExit):
        main(["demo-data", "--help"])
    out = capsys.readouterr().out
    assert "(default: 6)" in out and "(default: 0)" in out


def test_output_flags_follow_one_scheme_and_old_names_still_work():
    parser = build_parser()
    new = parser.parse_args(["test", "--output", "m.json", "--output-dir", "pics"])
    old = parser.parse_args(["test", "--json", "m.json", "--visualize-dir", "pics"])
    assert (new.json, new.visualize_dir) == (old.json, old.visualize_dir) == ("m.json", "pics")
    for name, sub in all_parsers(parser):
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--output"):
                    assert flag in ("--output", "--output-dir"), f"{name} {flag}"


def test_train_without_config_is_a_one_line_error_not_a_multi_day_run(tmp_path, capsys):
    assert main(["train", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "train needs --config" in err and "--config demo" in err and "cpu" in err
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        assert main(["train", "--config", "demo", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert f"{blocker} is a file" in err
    assert blocker.read_text() == "x"


def test_failed_start_removes_only_the_folder_it_created(tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    assert main(["train", "--config", "demo", "--data-root", str(tmp_path / "nothere"), "--output-dir",
                 str(out)]) == 2
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["train", "--config", "demo", "--data-root", str(tmp_path / "nothere"), "--output-dir",
                 str(kept)]) == 2
    assert (kept / "notes.txt").read_text() == "mine"


def test_results_go_to_stdout_progress_to_stderr(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--identities", "4", "--cameras", "2"]) == 0
    captured = capsys.readouterr()
    assert "demo dataset written to" in captured.out and "demo dataset written to" not in captured.err


# ---------------------------------------------------------------------------- own crops, end to end
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_crops")
    assert main(["demo-data", str(root), "--identities", "40", "--cameras", "3", "--seed", "4"]) == 0
    return root


@pytest.fixture(scope="module")
def crops(demo, tmp_path_factory):
    """Demo training crops re-filed as a user would have them: one sub-folder per camera, plain names."""
    root = tmp_path_factory.mktemp("crops")
    for i, path in enumerate(sorted((demo / "bounding_box_train").glob("*.jpg"))):
        camera = path.name.split("_")[1][:2]  # c1, c2, c3
        (root / f"door-{camera}").mkdir(exist_ok=True)
        shutil.copy(path, root / f"door-{camera}" / f"IMG_{i:05d}.jpg")
    return root


def test_camera_sub_folders_train_with_the_camera_aware_switches_on(crops, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "demo", "--data-root", str(crops), "--output-dir", str(out),
                 "data.dataset=folder", *QUICK]) == 0  # the demo preset has the camera-aware switches on
    captured = capsys.readouterr()
    assert "cameras: one sub-folder per camera, 3 camera(s): door-c1, door-c2, door-c3" in captured.err
    assert "config: preset demo" in captured.err
    assert captured.out.startswith("done: ") and "done:" not in captured.err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["cluster"]["cross_camera_clusters"] >= 0


def test_single_camera_names_the_switches_to_turn_off_and_following_it_trains(crops, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(crops.rglob("*.jpg")):
        shutil.copy(path, flat / f"{path.parent.name}_{path.name}")
    argv = ["train", "--config", "demo", "--data-root", str(flat), "--output-dir", str(tmp_path / "run"),
            "data.dataset=folder", *QUICK]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    msg = err[-1]
    assert "every image of folder is camera 0" in msg and "sub-folder" in msg and "CSV" in msg
    switches = msg.split("; add ")[1].split(", or ")[0].split()
    # the five the preset turns on
    assert switches == ["memory.camera_aware=false", "cluster.camera_norm=false", "cluster.associate=false",
                        "ise.foreign=any", "memory.camera_online=0"]
    assert not (tmp_path / "run").exists()
    assert main(argv + switches) == 0  # following the hint: it trains
    assert (tmp_path / "run" / "checkpoint_last.pt").is_file()
    # the other way out the hint names: a CSV giving the cameras
    table = flat / "cams.csv"
    table.write_text("".join(f"{p.name},{p.name.split('_')[0]}\n" for p in sorted(flat.glob("*.jpg"))))
    assert main(["train", "--config", "demo", "--data-root", str(table), "--output-dir", str(tmp_path / "csv"),
                 "data.dataset=folder", *QUICK]) == 0


def test_config_description_names_a_yaml_file(tmp_path):
    from isereid.cli import _describe_config

    assert _describe_config("demo") == "preset demo"
    assert _describe_config(str(tmp_path / "mine.yaml")) == f"config file {tmp_path / 'mine.yaml'}"


# ---------------------------------------------------------------------------- hints that are true
def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, bad_eps, advice", [
    ([], 0.9, "lower cluster.eps"),  # every image in one cluster: a larger radius cannot split it
    (["cluster.min_samples=10"], 0.0001, "raise cluster.eps"),  # every image an outlier
])
def test_clustering_advice_points_the_right_way_and_following_it_trains(crops, tmp_path, capsys, extra, bad_eps,
                                                                        advice):
    argv = ["train", "--config", "demo", "--data-root", str(crops), "--output-dir", str(tmp_path / "run"),
            "data.dataset=folder", *QUICK, *extra]
    msg = one_line_error(argv + [f"cluster.eps={bad_eps}"], capsys)
    assert advice in msg and ("raise" if advice.startswith("lower") else "lower cluster.eps") not in msg
    assert main(argv + ["cluster.eps=0.6"]) == 0  # the advised direction, to the preset's radius: it trains
    assert "clusters" in capsys.readouterr().err


def test_backbone_file_as_checkpoint_points_at_pretrained_path_and_that_works(demo, tmp_path, capsys):
    import torch
    import torchvision

    backbone = tmp_path / "mnv2.pt"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), backbone)  # torchvision layout, random weights
    base = ["test", "--config", "demo", "--data-root", str(demo), "data.workers=0", "train.progress=false"]
    msg = one_line_error(base + ["--checkpoint", str(backbone)], capsys)
    assert "model.pretrained_path=FILE" in msg and "model.arch=ARCH" in msg and "mnv2.pt" in msg
    out = tmp_path / "m.json"
    assert main(base + ["model.arch=mobilenet_v2", f"model.pretrained_path={backbone}", "--output", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["mAP"] <= 1
