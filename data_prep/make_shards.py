"""Write webdataset tar shards (sketch.png, photo.jpg, json) of the splits, in parallel and resumably."""

from dataclasses import dataclass

from sketch2real.cli import UserError, check_output_dir, lock_output_dir, option, parse_options, run_main
from sketch2real.shards import write_shards


@dataclass(frozen=True)
class Options:
    """Pack each split into {split}-NNNNNN.tar shards plus a {split}.json index of counts and keys."""

    splits_dir: str = option(help="folder with {train,val,test}.jsonl from build_splits.py")
    sketchy_root: str = option(help="the release root the splits were built from")
    output_dir: str = option(help="folder for the shards and their indexes")
    splits: list[str] = option(["train", "val", "test"], help="splits to write")
    max_samples_per_shard: int = option(1000, help="samples per shard at most", min=1)
    max_bytes_per_shard: int = option(0, help="bytes per shard at most (0: no byte limit)", min=0)
    num_workers: int = option(1, help="processes writing shards in parallel", min=1)


def check_options(opts: Options) -> Options:
    """What the flags' own ranges cannot say (prepare.py checks it before its first step writes anything)."""
    if not opts.splits:
        raise UserError("--splits: give at least one split to write")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = check_options(parse_options(Options, argv))
    lock_output_dir(check_output_dir(opts.output_dir))
    summary = write_shards(
        opts.splits_dir, opts.sketchy_root, opts.output_dir, opts.splits,
        opts.max_samples_per_shard, opts.max_bytes_per_shard, opts.num_workers,
    )
    for split, counts in summary.items():
        left_out = f", {counts['left_out']} left out (undecodable images: see {split}.json)" if counts["left_out"] else ""
        print(f"{split}: {counts['samples']} samples in {counts['shards']} shard(s), {counts['written']} written now{left_out}")


if __name__ == "__main__":
    run_main(main)
