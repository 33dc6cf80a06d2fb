import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sketch2real.cli import UserError
from sketch2real.sketchy import INVALID_KINDS, STATS_COLUMNS, SketchyRelease
from sketch2real.splits import build_splits, write_splits
from sketch2real.synthetic import make_synthetic_sketchy

from .helpers import run_script

PHOTO = re.compile(r"^256x256/photo/tx_000000000000/[^/]+/n\d{8}_\d+\.jpg$")
SKETCH = re.compile(r"^256x256/sketch/tx_000000000000/[^/]+/n\d{8}_\d+-\d+\.png$")


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_synthetic_layout_matches_the_release(sketchy_root):
    files = [str(p.relative_to(sketchy_root)) for p in sketchy_root.rglob("*") if p.is_file()]
    photos = [f for f in files if "/photo/" in f]
    sketches = [f for f in files if "/sketch/" in f]
    assert len(photos) == 5 * 8 and len(sketches) == 5 * 8 * 3
    assert all(PHOTO.match(p) for p in photos) and all(SKETCH.match(s) for s in sketches)
    categories = {Path(p).parent.name for p in photos}
    assert {"car_(sedan)", "hot-air_balloon"} <= categories
    for sketch in sketches:  # every sketch names an existing photo
        stem = Path(sketch).stem.rsplit("-", 1)[0]
        assert (sketchy_root / Path(sketch.replace("/sketch/", "/photo/")).parent / f"{stem}.jpg").is_file()
    info = sketchy_root / "info"
    with open(info / "stats.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == STATS_COLUMNS and len(rows) == len(sketches)
    assert any(r["Category"] == "car (sedan)" for r in rows)
    testset = (info / "testset.txt").read_text().split()
    assert len(testset) == 10 and all(re.match(r"^[^/]+/n\d{8}_\d+\.jpg$", t) for t in testset)
    flagged = sum(len((info / f"invalid-{k}.txt").read_text().split()) for k in INVALID_KINDS)
    assert flagged > 0


def test_synthetic_is_seeded(tmp_path):
    make_synthetic_sketchy(tmp_path / "a", photos_per_category=2, sketches_per_photo=2, test_photos_per_category=1, size=32, seed=3)
    make_synthetic_sketchy(tmp_path / "b", photos_per_category=2, sketches_per_photo=2, test_photos_per_category=1, size=32, seed=3)
    make_synthetic_sketchy(tmp_path / "c", photos_per_category=2, sketches_per_photo=2, test_photos_per_category=1, size=32, seed=4)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b") != _tree_digest(tmp_path / "c")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), val_fraction=st.sampled_from([0.0, 0.1, 0.3, 0.5]))
def test_no_photo_crosses_splits(sketchy_root, seed, val_fraction):
    result = build_splits(SketchyRelease(sketchy_root), val_fraction=val_fraction, seed=seed)
    photos = {s: {(r["category"], r["photo_id"]) for r in rows} for s, rows in result.rows.items()}
    assert not photos["train"] & photos["test"]
    assert not photos["train"] & photos["val"]
    assert not photos["val"] & photos["test"]
    testset = {tuple(line.split("/")) for line in (sketchy_root / "info/testset.txt").read_text().split()}
    assert photos["test"] == {(c, Path(p).stem) for c, p in testset}
    keys = [r["key"] for rows in result.rows.values() for r in rows]
    assert len(keys) == len(set(keys))


def test_invalid_sketches_are_excluded_unless_kept(sketchy_root):
    release = SketchyRelease(sketchy_root)
    flagged = set().union(*(release.invalid(k) for k in INVALID_KINDS))
    result = build_splits(release)
    kept_ids = {f"{r['photo_id']}-{r['sketch_index']}" for rows in result.rows.values() for r in rows}
    assert flagged and not kept_ids & flagged
    assert result.report["excluded"]["sketches"] == len(flagged)
    assert sum(result.report["sketches"].values()) + len(flagged) == len(release.sketches())
    with_pose = build_splits(release, keep_invalid=("pose",))
    kept_pose = {f"{r['photo_id']}-{r['sketch_index']}" for rows in with_pose.rows.values() for r in rows} & flagged
    assert kept_pose == release.invalid("pose") - set().union(*(release.invalid(k) for k in INVALID_KINDS if k != "pose"))


def test_splits_are_byte_identical_for_a_seed(sketchy_root, tmp_path):
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        write_splits(build_splits(SketchyRelease(sketchy_root), val_fraction=0.3, seed=seed), tmp_path / name)
    read = {n: [(tmp_path / n / f"{s}.jsonl").read_bytes() for s in ("train", "val", "test")] for n in "abc"}
    assert read["a"] == read["b"]
    assert read["a"][0] != read["c"][0]  # another seed moves photos between train and val
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert set(report["per_category"]["train"]) == set(report["categories"])


def test_testset_naming_absent_photos_is_reported(sketchy_root, tmp_path):
    import shutil

    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    with open(root / "info/testset.txt", "a") as f:
        f.write("cat/n09999999_1.jpg\n")
    result = build_splits(SketchyRelease(root))
    assert result.report["testset_absent"] == ["cat/n09999999_1.jpg"]
    with pytest.raises(UserError, match="absent"):
        build_splits(SketchyRelease(root), strict_testset=True)


def test_category_without_photos_is_an_error(sketchy_root, tmp_path):
    import shutil

    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    shutil.rmtree(root / "256x256/photo/tx_000000000000/cat")
    with pytest.raises(UserError, match="'cat' has no photos"):
        build_splits(SketchyRelease(root))


def test_a_users_copy_with_stray_folders_re_saved_and_missing_photos(sketchy_root, tmp_path):
    """A copy as users have it: a notebook's hidden folder and an empty category folder are skipped (one warning), a
    photo re-saved as .JPG is still its sketches' photo (the row names the real file), and a sketch whose photo is
    missing is counted among the excluded ("no photo"), not dropped unseen."""
    import shutil

    base = build_splits(SketchyRelease(sketchy_root))
    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    rendered = root / "256x256"
    (rendered / "sketch/tx_000000000000/.ipynb_checkpoints").mkdir()
    (rendered / "sketch/tx_000000000000/zebra").mkdir()  # a category removed from the copy: an empty folder left
    (rendered / "photo/tx_000000000000/zebra").mkdir()
    cat = [r for r in base.rows["train"] if r["category"] == "cat"]
    resaved, lost = cat[0], next(r for r in cat if r["photo_id"] != cat[0]["photo_id"])
    jpg = root / resaved["photo_path"]
    jpg.rename(jpg.with_suffix(".JPG"))
    (root / lost["photo_path"]).unlink()
    result = build_splits(SketchyRelease(root))
    rows = {r["key"]: r for split in result.rows.values() for r in split}
    assert "zebra" not in result.report["categories"] and result.report["empty_categories"] == ["zebra"]
    assert rows[resaved["key"]]["photo_path"] == resaved["photo_path"][:-4] + ".JPG"
    drawn = len(list((rendered / "sketch/tx_000000000000/cat").glob(f"{lost['photo_id']}-*.png")))
    kept = sum(r["photo_id"] == lost["photo_id"] for split in base.rows.values() for r in split if r["category"] == "cat")
    assert lost["key"] not in rows and result.report["excluded"]["no photo"] == drawn >= kept > 0
    assert len(rows) == sum(len(split) for split in base.rows.values()) - kept



def test_a_mac_s_twin_files_and_a_photo_filed_in_two_categories_change_no_split_and_leak_nothing(sketchy_root, tmp_path):
    """A copy through a Mac (exFAT, SMB) has a `._<name>` twin of every file: read as photos, they took val slots
    (4 categories had no val sketch) and changed the seeded splits. A test photo filed again in another category
    (its sketches too) went to train there: the same photo in test and train."""
    import shutil

    base = build_splits(SketchyRelease(sketchy_root))
    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    for file in [p for p in (root / "256x256").rglob("*") if p.is_file()]:
        (file.parent / f"._{file.name}").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert build_splits(SketchyRelease(root)).rows == base.rows
    test_photo = next(r for r in base.rows["test"] if r["category"] == "cat")
    for kind, pattern in (("photo", f"{test_photo['photo_id']}.jpg"), ("sketch", f"{test_photo['photo_id']}-*.png")):
        for file in (root / f"256x256/{kind}/tx_000000000000/cat").glob(pattern):
            shutil.copy(file, root / f"256x256/{kind}/tx_000000000000/apple" / file.name)
    result = build_splits(SketchyRelease(root))
    splits_of = {split for split, rows in result.rows.items() for r in rows if r["photo_id"] == test_photo["photo_id"]}
    assert splits_of == {"test"} and result.report["photos_in_several_categories"] == 1

@pytest.mark.parametrize(
    "args, message",
    [
        (["--sketchy_root", "/nonexistent/sketchy"], "Sketchy root not found"),
        (["--sketchy_root", "{tmp}"], "is not a Sketchy release"),
        (["--sketchy_root", "{root}", "--categories", "zebra"], "unknown category 'zebra'"),
        (["--sketchy_root", "{root}", "--keep_invalid", "blurry"], "unknown invalid list"),
        (["--sketchy_root", "{root}", "--val_fraction", "1.5"], "--val_fraction must be in"),
        (["--sketchy_root", "{root}", "--no_such_flag", "1"], "unrecognized arguments"),
        (["--sketchy_root", "{root}", "--info_dir", "{root}/info/stats.csv"], "is a file: give the folder that holds it"),
    ],
)
def test_build_splits_cli_errors_are_one_line(sketchy_root, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, root=sketchy_root) for a in args]
    proc = run_script("data_prep/build_splits.py", *args, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_bom_in_the_info_lists_changes_no_split(sketchy_root, tmp_path):
    """Windows editors start a file with a UTF-8 BOM: read as part of the first name, it moved a test photo into
    train/val (a leak) and kept a flagged sketch."""
    import shutil

    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    for name in ("testset.txt", *(f"invalid-{k}.txt" for k in INVALID_KINDS)):
        path = root / "info" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    clean, bom = build_splits(SketchyRelease(sketchy_root)), build_splits(SketchyRelease(root))
    assert bom.rows == clean.rows and bom.report == clean.report and not bom.report["testset_absent"]


def test_odd_files_and_folders_of_a_copy_are_used_or_counted_never_dropped_unseen(sketchy_root, tmp_path, caplog):
    """A sketch saved as `.PNG` is a sketch; a file not named `<photo>-<k>.png`, a category folder that is not one of
    Sketchy's, a photo folder with no sketch folder and a photo with no sketch are each one warning line and a count in
    the report."""
    import shutil

    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    base = build_splits(SketchyRelease(sketchy_root))
    rendered = root / "256x256"
    row = base.rows["train"][0]
    upper = root / row["sketch_path"]
    upper.rename(upper.with_suffix(".PNG"))
    shutil.copy(root / base.rows["train"][1]["sketch_path"], upper.parent / "x-1 (1).png")
    (upper.parent / "notes.txt").write_text("mine")
    shutil.copytree(rendered / "photo/tx_000000000000/cat", rendered / "photo/tx_000000000000/Mystery (New)")
    shutil.copytree(rendered / "sketch/tx_000000000000/cat", rendered / "sketch/tx_000000000000/Mystery (New)")
    shutil.copytree(rendered / "photo/tx_000000000000/cat", rendered / "photo/tx_000000000000/photo_only")
    shutil.copy(root / row["photo_path"], rendered / "photo/tx_000000000000/apple/n07739125_99999.jpg")
    caplog.clear()
    result = build_splits(SketchyRelease(root))
    rows = {r["key"]: r for split in result.rows.values() for r in split}
    assert rows[row["key"]]["sketch_path"] == row["sketch_path"][:-4] + ".PNG"
    report = result.report
    assert "Mystery (New)" in report["categories"] and report["unknown_categories"] == ["Mystery (New)"]
    assert report["photo_only_categories"] == ["photo_only"] and report["photos_without_sketches"] == 1
    assert report["stray_files"] == 2
    assert sum(report["sketches"].values()) == sum(base.report["sketches"].values()) + sum(
        base.report["per_category"][s].get("cat", 0) for s in ("train", "val", "test"))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for words in ("not among Sketchy's 125 categories, used as categories: Mystery (New)",
                  "1 photo folder(s) with no sketch folder left out: photo_only",
                  "1 photo(s) without any sketch (in no split's rows), e.g. apple/n07739125_99999",
                  "2 file(s) in the sketch folders not named like a sketch"):
        assert sum(words in line for line in lines) == 1, (words, lines)


@pytest.mark.parametrize("place", ["rendered_256x256/256x256", "root is 256x256"])
def test_the_release_is_found_where_the_archive_extracted_it(place, sketchy_root, tmp_path):
    """rendered_256x256.7z extracts to 256x256/ (what the synthetic release writes); extracted into a folder of its
    name, or with 256x256/ itself given as the root (info/ beside it), the splits are the same photos and sketches."""
    import shutil

    clean = build_splits(SketchyRelease(sketchy_root))
    copy = tmp_path / "copy"
    shutil.copytree(sketchy_root, copy)
    if place == "root is 256x256":
        root = copy / "256x256"
    else:
        (copy / "rendered_256x256").mkdir()
        (copy / "256x256").rename(copy / "rendered_256x256/256x256")
        root = copy
    moved = build_splits(SketchyRelease(root))
    for split, rows in clean.rows.items():
        assert [r["key"] for r in moved.rows[split]] == [r["key"] for r in rows], split
        assert all((root / r["sketch_path"]).is_file() and (root / r["photo_path"]).is_file() for r in moved.rows[split])
    shutil.rmtree(copy / "info")  # (the root's info/, or the one beside 256x256/)
    with pytest.raises(UserError, match="missing .*info"):
        SketchyRelease(root)
    with pytest.raises(UserError, match="no 256x256/photo/ and 256x256/sketch/ in it, nor in rendered_256x256/"):
        SketchyRelease(tmp_path)


def test_the_sketch_rendering_is_chosen_apart_from_the_photo_s_and_unaligned_pairs_are_said(sketchy_root, tmp_path):
    """Photos come in 2 renderings and sketches in 6: one --augmentation for both read photo tx_000100000000 (box
    +10%) with sketch tx_000100000000 (re-centred at 78%), unaligned pairs, silently."""
    import shutil

    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    shutil.copytree(root / "256x256/sketch/tx_000000000000", root / "256x256/sketch/tx_000000000010")
    proc = run_script("data_prep/build_splits.py", "--sketchy_root", root, "--sketch_augmentation", "tx_000000000010",
                      "--output_dir", tmp_path / "splits")
    assert "not pixel-aligned pairs" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "splits/train.jsonl").read_text().splitlines()]
    assert rows and all(r["sketch_path"].startswith("256x256/sketch/tx_000000000010/") and
                        r["photo_path"].startswith("256x256/photo/tx_000000000000/") for r in rows)
    proc = run_script("data_prep/build_splits.py", "--sketchy_root", root, "--photo_augmentation", "tx_000000000010",
                      "--output_dir", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "--photo_augmentation" in proc.stderr and "Traceback" not in proc.stderr


def test_a_test_list_spelling_categories_otherwise_still_holds_its_photos_out_of_training(sketchy_root, tmp_path,
                                                                                          caplog):
    """stats.csv spells `car (sedan)`; a testset.txt written that way (or naming another folder) matched no photo and
    sent the test photos to train, a leak. An invalid list in another format excluded nothing, unsaid."""
    import shutil

    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    testset = root / "info/testset.txt"
    lines = testset.read_text().splitlines()
    assert any(line.startswith("car_(sedan)/") for line in lines) and any(line.startswith("cat/") for line in lines)
    testset.write_text("\n".join(line.replace("car_(sedan)/", "car (sedan)/").replace("cat/", "kitten/")
                                 for line in lines) + "\n")
    invalid = root / "info/invalid-pose.txt"
    invalid.write_text("".join(f"{line.split('-')[0]},{line.split('-')[1]}\n" for line in invalid.read_text().split()))
    clean = build_splits(SketchyRelease(sketchy_root), keep_invalid=("pose",))
    caplog.clear()
    result = build_splits(SketchyRelease(root), keep_invalid=("pose",))
    assert [r["key"] for r in result.rows["test"]] == [r["key"] for r in clean.rows["test"]]
    assert not result.report["testset_absent"]
    assert "invalid-pose.txt: " in caplog.text and "name no sketch of the release" in caplog.text


def test_categories_left_without_a_val_photo_are_said(tmp_path, caplog):
    """3 non-test photos at --val_fraction 0.1 round to none: the val split was empty, unsaid, and the trainers then
    dropped their held-out loss silently."""
    root = tmp_path / "release"
    make_synthetic_sketchy(root, categories=["cat", "apple"], photos_per_category=5, sketches_per_photo=1,
                           test_photos_per_category=2, size=32)
    caplog.clear()
    result = build_splits(SketchyRelease(root), val_fraction=0.1)
    assert not result.rows["val"] and "2 of 2 categories have no val photo (--val_fraction 0.1" in caplog.text
    caplog.clear()
    assert build_splits(SketchyRelease(root), val_fraction=0.4).rows["val"] and "no val photo" not in caplog.text
