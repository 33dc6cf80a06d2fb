import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from sketch2real.cli import UserError
from sketch2real.io import read_jsonl
from sketch2real.shards import ShardSamples, ShardStream, load_index, stream_loader, write_shards

from .helpers import corrupt_one_sketch, run_script


def _keys(loader) -> tuple[list[str], int, int]:
    keys, batches, corrupt = [], 0, 0
    for batch in loader:
        batches += 1
        corrupt += int(batch["corrupt"].sum())
        keys += [k for k, pad in zip(batch["key"], batch["pad"].tolist()) if not pad]
    return keys, batches, corrupt


def test_round_trip_keeps_bytes_and_metadata(shard_dir, splits_dir, sketchy_root):
    rows = {r["key"]: r for r in read_jsonl(splits_dir / "train.jsonl")}
    index = load_index(shard_dir, "train")
    assert index["total"] == len(rows) == sum(s["count"] for s in index["shards"])
    assert all(s["count"] <= 16 for s in index["shards"])
    seen = set()
    for shard in index["shards"]:
        with tarfile.open(shard_dir / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.rpartition("/")[2].partition(".")
                key = f"{member.name.rpartition('/')[0]}/{key}"
                data = tar.extractfile(member).read()
                row = rows[key]
                if suffix == "sketch.png":
                    assert data == (sketchy_root / row["sketch_path"]).read_bytes()
                elif suffix == "photo.jpg":
                    assert data == (sketchy_root / row["photo_path"]).read_bytes()
                else:
                    meta = json.loads(data)
                    assert meta["category"] == row["category"] and meta["split"] == "train"
                seen.add(key)
    assert seen == set(rows)


def test_plain_webdataset_reads_the_shards(shard_dir):
    import webdataset as wds

    names = [str(shard_dir / s["name"]) for s in load_index(shard_dir, "val")["shards"]]
    samples = list(wds.WebDataset(names, shardshuffle=False))
    assert len(samples) == load_index(shard_dir, "val")["total"]
    assert {"sketch.png", "photo.jpg", "json"} <= set(samples[0])


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_and_workers_cover_every_sample_once_with_equal_batches(shard_dir, shuffle):
    total = load_index(shard_dir, "train")["total"]
    world = 3 if total % 3 else 4  # an uneven split on purpose
    assert total % world
    all_keys, batch_counts = [], []
    for rank in range(world):
        stream = ShardStream(shard_dir, "train", resolution=16, rank=rank, world_size=world, shuffle=shuffle, seed=7)
        keys, batches, _ = _keys(stream_loader(stream, batch_size=4, num_workers=2))
        all_keys += keys
        batch_counts.append(batches)
    assert sorted(all_keys) == sorted(k for s in load_index(shard_dir, "train")["shards"] for k in s["keys"])
    assert len(set(batch_counts)) == 1


def test_two_ranks_two_workers(shard_dir):
    keys = []
    counts = []
    for rank in range(2):
        stream = ShardStream(shard_dir, "test", fields=("sketch",), resolution=16, rank=rank, world_size=2)
        k, batches, _ = _keys(stream_loader(stream, batch_size=2, num_workers=2))
        keys += k
        counts.append(batches)
    assert len(keys) == len(set(keys)) == load_index(shard_dir, "test")["total"]
    assert counts[0] == counts[1]


def test_category_filter_and_shuffle_seeding(shard_dir):
    stream = ShardStream(shard_dir, "train", resolution=16, categories=["cat"], shuffle=True, seed=1, shuffle_buffer=8)
    first = [s["key"] for s in stream]
    assert first and all(k.startswith("cat/") for k in first)
    assert first == [s["key"] for s in stream]
    stream.set_epoch(1)
    assert sorted(first) == sorted(s["key"] for s in stream)
    with pytest.raises(UserError, match="unknown category 'unicorn'"):
        ShardStream(shard_dir, "train", categories=["unicorn"])


def test_decoded_images_are_tensors_in_range(shard_dir):
    sample = next(iter(ShardStream(shard_dir, "val", resolution=32)))
    assert sample["sketch"].shape == (3, 32, 32) and sample["photo"].shape == (3, 32, 32)
    assert sample["sketch"].min() >= -1 and sample["sketch"].max() <= 1
    assert sample["sketch"].max() == 1  # white paper
    pil = next(iter(ShardStream(shard_dir, "val", fields=("photo",), as_tensor=False)))
    assert pil["photo"].size == (64, 64) and "sketch" not in pil


def test_random_access_matches_the_stream(shard_dir):
    samples = ShardSamples(shard_dir, "val", resolution=16)
    streamed = {s["key"]: s for s in ShardStream(shard_dir, "val", resolution=16)}
    assert len(samples) == len(streamed)
    for i in (0, len(samples) - 1):
        item = samples[i]
        assert torch.equal(item["sketch"], streamed[item["key"]]["sketch"])


def _copy_shards(shard_dir: Path, target: Path) -> Path:
    shutil.copytree(shard_dir, target)
    return target


def test_corrupt_sample_is_skipped_and_counted(shard_dir, tmp_path, caplog):
    broken = _copy_shards(shard_dir, tmp_path / "shards")
    name, key = corrupt_one_sketch(broken, "val")
    keys, _, corrupt = _keys(stream_loader(ShardStream(broken, "val", resolution=16), batch_size=4))
    assert f"corrupt sample {name}:{key} (sketch: " in caplog.text  # one line: shard, key, why
    assert corrupt == 1
    assert len(keys) == load_index(broken, "val")["total"] - 1
    assert key not in keys


@pytest.mark.parametrize("cut, said", [("inside", "unreadable tar"), ("between", "ends before")])
def test_truncated_tar_is_skipped_not_fatal(cut, said, shard_dir, tmp_path, caplog):
    """A shard cut short: its samples past the cut are counted as corrupt, with one line saying why, whether the cut
    falls inside a member (an unreadable tar) or between two (a shorter tar that reads cleanly: it said nothing)."""
    broken = _copy_shards(shard_dir, tmp_path / "shards")
    name = load_index(broken, "test")["shards"][0]["name"]
    data = (broken / name).read_bytes()
    with tarfile.open(broken / name) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
    (broken / name).write_bytes(data[: middle.offset_data + middle.size // 2] if cut == "inside" else data[: middle.offset])
    keys, _, corrupt = _keys(stream_loader(ShardStream(broken, "test", resolution=16), batch_size=4))
    # each lost sample's own line is logged once per process: the second case's samples were the first's
    assert said in caplog.text and (cut == "between" or "missing from a truncated shard" in caplog.text)
    total = load_index(broken, "test")["total"]
    assert 0 < corrupt < total and len(keys) + corrupt == total


def test_a_shard_rebuilt_under_a_reading_job_is_one_line_not_other_samples_images(shard_dir, tmp_path):
    """A reader keeps each shard's member offsets; make_shards.py replacing the shards while a job ran made those
    offsets read other samples' bytes (a third decoded fine, as another image: a ControlNet trained on them and
    exited 0)."""
    folder = tmp_path / "shards"
    shutil.copytree(shard_dir, folder)
    samples = ShardSamples(folder, "train", fields=("sketch",), resolution=32)
    shard = samples.refs[0].shard
    in_shard = [i for i, ref in enumerate(samples.refs) if ref.shard == shard]
    first = samples.read(in_shard[0])["sketch"]
    other = next(ref.shard for ref in samples.refs if ref.shard != shard)
    shutil.copy(folder / other, folder / "rebuilt.tmp")
    os.replace(folder / "rebuilt.tmp", folder / shard)  # as make_shards.py writes a shard: whole, then renamed
    with pytest.raises(UserError, match=f"{folder / shard} was replaced while this job read it"):
        samples.read(in_shard[1])
    # the same bytes with another time (touched against a scratch purge, copied without -t): read on
    shutil.rmtree(folder)
    shutil.copytree(shard_dir, folder)
    touched = ShardSamples(folder, "train", fields=("sketch",), resolution=32)
    before = touched.read(in_shard[0])["sketch"]
    os.utime(folder / shard, ns=(1, 1))
    assert torch.equal(touched.read(in_shard[0], ("sketch",))["sketch"], before) and first.shape == before.shape
    touched.read(in_shard[1])


def test_rerun_skips_finished_shards_and_rewrites_missing_or_partial(splits_dir, sketchy_root, tmp_path):
    out = tmp_path / "shards"
    first = write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=16, progress=False)
    assert first["train"]["written"] == first["train"]["shards"] > 1
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=16, progress=False)
    assert again["train"]["written"] == 0
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # A killed writer leaves a temp file and no final shard: that shard is written again.
    (out / "train-000001.tar").rename(out / ".train-000001.tar.killed.tmp")
    # A shard whose bytes were cut short is not "finished" either once the plan changes.
    third = write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=16, progress=False)
    assert third["train"]["written"] == 1
    # A shard cut short on disk (same sources, so the same fingerprint) is written again, whole.
    whole = (out / "train-000000.tar").read_bytes()
    (out / "train-000000.tar").write_bytes(whole[: len(whole) // 2])
    cut = write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=16, progress=False)
    assert cut["train"]["written"] == 1 and len((out / "train-000000.tar").read_bytes()) == len(whole)
    # A different plan (smaller shards) rewrites everything and leaves no stale shard behind.
    fourth = write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=100, progress=False)
    assert fourth["train"]["shards"] == 1 and sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_an_interrupted_rerun_leaves_no_index_that_lies_and_no_temp_file(splits_dir, sketchy_root, tmp_path, monkeypatch):
    """A rerun with other settings killed after rewriting some shards: the old index (which named the old shards'
    keys) is gone, so readers stop in one line instead of reading wrong samples; a killed writer's temp files are
    removed by the next run."""
    import sketch2real.shards as shards

    out = tmp_path / "shards"
    write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=16, progress=False)
    real, calls = shards._write_one_shard, []

    def killed_after_one(job):
        calls.append(job)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(shards, "_write_one_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=5, progress=False)
    assert len(calls) == 2 and not (out / "train.json").exists()
    with pytest.raises(UserError, match="no shard index"):
        ShardSamples(out, "train")
    monkeypatch.undo()
    for leftover in ("..train.done.json.k1ll3d.tmp", ".train-000002.tar.k1ll3d.tmp", ".train.json.k1ll3d.tmp"):
        (out / leftover).write_bytes(b"half")
    again = write_shards(splits_dir, sketchy_root, out, ("train",), max_samples=5, progress=False)
    assert again["train"]["written"] == again["train"]["shards"] - 1  # the shard written before the kill is kept
    assert [s["count"] for s in load_index(out, "train")["shards"]][:2] == [5, 5]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_max_bytes_per_shard_holds_on_disk(splits_dir, sketchy_root, tmp_path):
    """The limit counts what tar adds (a 512-byte header per member, padding to 512, the metadata member, the end
    blocks and record padding): small images were 3-4x over it. A sample over the limit gets a shard of its own."""
    out = tmp_path / "shards"
    summary = write_shards(splits_dir, sketchy_root, out, ("train",), max_bytes=40_000, progress=False)
    sizes = [p.stat().st_size for p in sorted(out.glob("train-*.tar"))]
    assert summary["train"]["shards"] == len(sizes) > 2 and max(sizes) <= 40_000
    assert max(sizes) > 40_000 - 2 * 10_240  # filled, not one sample each
    tiny = write_shards(splits_dir, sketchy_root, tmp_path / "tiny", ("val",), max_bytes=1_000, progress=False)
    assert tiny["val"]["shards"] == tiny["val"]["samples"]


def test_undecodable_source_images_are_left_out_listed_and_warned(splits_dir, sketchy_root, tmp_path, caplog):
    """A truncated JPEG, a zero-byte PNG and a 100-byte PNG in the release were packed as they were (and every reader
    then met them): they are decoded on the way in, their samples left out of the shards with one warning line each
    (shard and key), and listed in the index, whose counts are then those of the shards; any number of writers
    leave out the same samples and write the same bytes."""
    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    rows = read_jsonl(splits_dir / "train.jsonl")
    photo = root / rows[0]["photo_path"]
    photo.write_bytes(photo.read_bytes()[:-40])
    (root / rows[20]["sketch_path"]).write_bytes(b"")
    (root / rows[40]["sketch_path"]).write_bytes((root / rows[40]["sketch_path"]).read_bytes()[:100])
    expected = {r["key"] for r in rows if r["photo_path"] == rows[0]["photo_path"]} | {rows[20]["key"], rows[40]["key"]}
    caplog.clear()
    summary = write_shards(splits_dir, root, tmp_path / "one", ("train",), max_samples=16, progress=False)
    index = load_index(tmp_path / "one", "train")
    assert summary["train"]["left_out"] == index["left_out"]["count"] == len(expected) >= 4
    assert set(index["left_out"]["keys"]) == set(index["left_out"]["reasons"]) == expected
    assert index["total"] == summary["train"]["samples"] == len(rows) - len(expected) == len(ShardSamples(tmp_path / "one", "train"))
    assert index["rows"] == len(rows) and sum(s["count"] for s in index["shards"]) == index["total"]
    warned = [r.getMessage() for r in caplog.records if "left out of the shard" in r.getMessage()]
    assert len(warned) == len(expected)
    for key, reason in index["left_out"]["reasons"].items():  # "train-00000N.tar: photo: OSError: ..."
        shard, _, why = reason.partition(": ")
        assert sum(w.startswith(f"corrupt sample {shard}:{key} ({why}") for w in warned) == 1
    samples = ShardSamples(tmp_path / "one", "train", resolution=8)
    assert {samples[i]["key"] for i in range(len(samples))} == {r["key"] for r in rows} - expected  # all readable
    write_shards(splits_dir, root, tmp_path / "two", ("train",), max_samples=16, num_workers=2, progress=False)
    assert load_index(tmp_path / "two", "train") == index
    for shard in index["shards"]:
        assert (tmp_path / "one" / shard["name"]).read_bytes() == (tmp_path / "two" / shard["name"]).read_bytes()


def test_a_source_image_changed_under_its_name_is_written_again_and_missing_files_are_one_line(splits_dir,
                                                                                                sketchy_root, tmp_path):
    """A fixed or resized copy of the release keeps its file names: a rerun writes the shards whose images changed
    (their index fingerprint, the FID reference cache's key, changes with them), no other. A partial copy of the
    release stops in one line counting what is missing, before any shard is written."""
    from PIL import Image

    root = tmp_path / "release"
    shutil.copytree(sketchy_root, root)
    out = tmp_path / "shards"
    write_shards(splits_dir, root, out, ("train",), max_samples=16, progress=False)
    before = {e["name"]: e["fingerprint"] for e in load_index(out, "train")["shards"]}
    row = read_jsonl(splits_dir / "train.jsonl")[20]  # in the second shard
    Image.new("RGB", (64, 64), "red").save(root / row["photo_path"], format="JPEG")
    again = write_shards(splits_dir, root, out, ("train",), max_samples=16, progress=False)
    after = {e["name"]: e["fingerprint"] for e in load_index(out, "train")["shards"]}
    assert again["train"]["written"] == 1 and {n for n in before if before[n] != after[n]} == {"train-000001.tar"}
    with tarfile.open(out / "train-000001.tar") as tar:
        assert tar.extractfile(f"{row['key']}.photo.jpg").read() == (root / row["photo_path"]).read_bytes()

    shutil.rmtree((root / row["photo_path"]).parent)  # a category's photos not copied
    with pytest.raises(UserError, match=r"^\d+ file\(s\) of split train are not in --sketchy_root .* \(first: "):
        write_shards(splits_dir, root, tmp_path / "partial", ("train",), max_samples=16, progress=False)
    assert not (tmp_path / "partial").exists() or not list((tmp_path / "partial").glob("*.tar"))


def test_parallel_writers_give_identical_shards(splits_dir, sketchy_root, tmp_path):
    write_shards(splits_dir, sketchy_root, tmp_path / "one", ("train",), max_samples=8, num_workers=1, progress=False)
    write_shards(splits_dir, sketchy_root, tmp_path / "two", ("train",), max_samples=8, num_workers=2, progress=False)
    one = sorted((tmp_path / "one").glob("*.tar"))
    assert len(one) > 2
    for path in one:
        with tarfile.open(path) as a, tarfile.open(tmp_path / "two" / path.name) as b:
            assert [(m.name, a.extractfile(m).read()) for m in a.getmembers()] == [
                (m.name, b.extractfile(m).read()) for m in b.getmembers()
            ]


def test_make_shards_cli_errors(tmp_path, sketchy_root):
    proc = run_script("data_prep/make_shards.py", "--splits_dir", tmp_path, "--sketchy_root", sketchy_root,
                      "--output_dir", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "build_splits.py first" in proc.stderr
    assert not os.path.exists(tmp_path / "o" / "train.json")


def test_prepare_takes_config_and_data_dir_anywhere_and_checks_both_steps_first(sketchy_root, tmp_path):
    """prepare.py refused `--config` (every script takes it), `--data_dir=X` and `--data_dir` not first; and with a bad
    flag of the second step it wrote the splits before failing."""
    proc = run_script("data_prep/prepare.py", "--sketchy_root", sketchy_root, "--num_workers", "0",
                      "--data_dir", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "--num_workers must be at least 1" in proc.stderr and not (tmp_path / "bad").exists()
    config = tmp_path / "prep.yaml"
    config.write_text("seed: 3\ncategories: [cat, apple]\nmax_samples_per_shard: 40\n")
    run_script("data_prep/prepare.py", "--sketchy_root", sketchy_root, "--seed", "5", "--config", config,
               f"--data_dir={tmp_path / 'data'}", "--max_samples_per_shard", "7")  # before the file: its value wins
    report = json.loads((tmp_path / "data" / "splits" / "report.json").read_text())
    assert report["seed"] == 3 and report["categories"] == ["apple", "cat"]
    assert max(s["count"] for s in load_index(tmp_path / "data" / "shards", "train")["shards"]) == 7
    config.write_text("seed: -1\n")
    proc = run_script("data_prep/prepare.py", "--config", config, "--sketchy_root", sketchy_root, "--data_dir",
                      tmp_path / "neg", check=False)
    assert proc.returncode == 2 and f"--seed must be at least 0, got -1 (in config file {config})" in proc.stderr
    helped = run_script("data_prep/prepare.py", "--data_dir", tmp_path / "help", "--help")  # "unknown option --help"
    assert "usage: prepare.py --data_dir DIR" in helped.stdout and not (tmp_path / "help").exists()
