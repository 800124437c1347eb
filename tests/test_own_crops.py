"""Your own camera crops (`data.dataset=folder`): cameras from per-camera sub-folders, Market-style
names or a CSV; the summary says which; and the data-path hints, each followed to see it work."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from isereid.data import Sample, build_dataset
from isereid.errors import DatasetError


def touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_one_sub_folder_per_camera_any_names(tmp_path):
    files = {"lobby/IMG_0001.jpg": 1, "lobby/deep/x.png": 1, "entrance/a.jpg": 0, "yard/frame 7.jpeg": 2}
    for rel in files:
        touch(tmp_path / rel)
    ds = build_dataset("folder", tmp_path)
    assert ds.train == sorted((Sample(str(tmp_path / rel), -1, cam) for rel, cam in files.items()),
                              key=lambda s: s.path)
    assert not ds.has_test
    line = ds.summary().splitlines()[-1]
    assert line == "  cameras: one sub-folder per camera, 3 camera(s): entrance, lobby, yard"


def test_numeric_camera_folders_sort_by_number(tmp_path):
    for cam in ("2", "10", "1"):
        touch(tmp_path / cam / "a.jpg")
    ds = build_dataset("folder", tmp_path)
    assert {Path(s.path).parent.name: s.camid for s in ds.train} == {"1": 0, "2": 1, "10": 2}


def test_market_names_win_over_folders(tmp_path):
    """Identity folders (ROOT/<pid>/<Market name>) must not be taken for cameras."""
    touch(tmp_path / "0001" / "0001_c1s1_000001_00.jpg")
    touch(tmp_path / "0001" / "0001_c3s1_000002_00.jpg")
    touch(tmp_path / "0002" / "0002_c2s1_000003_00.jpg")
    ds = build_dataset("folder", tmp_path)
    assert [(s.pid, s.camid) for s in ds.train] == [(1, 0), (1, 2), (2, 1)]
    assert "Market-style file names, 3 camera(s): c1, c2, c3" in ds.summary()


def test_flat_folder_has_one_camera_and_says_how_to_give_cameras(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    ds = build_dataset("folder", tmp_path)
    assert {s.camid for s in ds.train} == {0}
    summary = ds.summary()
    assert "none found, every image is camera 0" in summary and "sub-folder" in summary and "CSV" in summary


def test_csv_with_header_labels_and_optional_identities(tmp_path):
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        touch(tmp_path / "crops" / name)
    table = tmp_path / "crops" / "cams.csv"
    table.write_text("path,camera,pid\nsub/c.jpg,door,\na.jpg,door,7\n\nb.jpg,hall,3\n")
    ds = build_dataset("folder", table)
    crops = tmp_path / "crops"
    assert ds.train == [Sample(str(crops / "a.jpg"), 7, 0), Sample(str(crops / "b.jpg"), 3, 1),
                        Sample(str(crops / "sub" / "c.jpg"), -1, 0)]
    assert "CSV cams.csv, 2 camera(s): door, hall" in ds.summary()
    table.write_text("a.jpg,1\nb.jpg,2\n")  # no header, no identities
    assert [(s.pid, s.camid) for s in build_dataset("folder", table).train] == [(-1, 0), (-1, 1)]


@pytest.mark.parametrize("text, needle", [
    ("a.jpg\n", "line 1 is not 'path,camera[,pid]'"),
    ("a.jpg,1,x\n", "identity 'x' is not an integer"),
    ("a.jpg,1\nnope.jpg,1\n", "not found: "),
    ("path,camera\n", "lists no images"),
])
def test_csv_errors_name_the_line(tmp_path, text, needle):
    touch(tmp_path / "a.jpg")
    table = tmp_path / "c.csv"
    table.write_text(text)
    with pytest.raises(DatasetError, match=re.escape(needle)) as exc:
        build_dataset("folder", table)
    assert "\n" not in str(exc.value)


def test_path_typo_suggests_the_closest_folder_and_the_suggestion_loads(tmp_path):
    touch(tmp_path / "crops" / "cam1" / "a.jpg")
    touch(tmp_path / "crops" / "cam2" / "b.jpg")
    with pytest.raises(DatasetError) as exc:
        build_dataset("folder", tmp_path / "corps")
    msg = str(exc.value)
    assert f"did you mean {tmp_path / 'crops'}?" in msg and "demo-data" not in msg
    guess = msg.split("did you mean ")[1].split("?")[0]
    assert len(build_dataset("folder", guess).train) == 2  # following the hint works
    # a typo in a middle part keeps the rest of the path when that exists
    with pytest.raises(DatasetError, match=re.escape(f"did you mean {tmp_path / 'crops' / 'cam1'}")):
        build_dataset("folder", tmp_path / "crop" / "cam1")


def test_demo_root_typo_suggests_the_demo_folder_not_demo_data(tmp_path):
    from isereid.data.demo import generate_demo_data

    generate_demo_data(tmp_path / "demo", identities=4, cameras=2, seed=0)
    with pytest.raises(DatasetError) as exc:
        build_dataset("demo", tmp_path / "dmeo")
    msg = str(exc.value)
    assert "demo-data" not in msg and f"did you mean {tmp_path / 'demo'}?" in msg
    assert build_dataset("demo", msg.split("did you mean ")[1].split("?")[0]).has_test
    with pytest.raises(DatasetError, match="create it with `isereid demo-data"):  # nothing close: create it
        build_dataset("demo", tmp_path / "elsewhere")


def test_market_preset_on_own_crops_points_at_folder_and_that_works(tmp_path):
    touch(tmp_path / "cam_a" / "1.jpg")
    touch(tmp_path / "cam_b" / "2.jpg")
    with pytest.raises(DatasetError, match="add data.dataset=folder") as exc:
        build_dataset("demo", tmp_path)
    assert "bounding_box_train" in str(exc.value)
    assert {s.camid for s in build_dataset("folder", tmp_path).train} == {0, 1}
    (tmp_path / "empty").mkdir()  # no images at all: no folder hint
    with pytest.raises(DatasetError) as exc:
        build_dataset("market1501", tmp_path / "empty")
    assert "data.dataset=folder" not in str(exc.value)
