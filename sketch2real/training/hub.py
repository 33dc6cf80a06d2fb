"""`--push_to_hub`: the trained model on the Hugging Face Hub, as diffusers' example scripts push it.

The repository is created (or found) when the run starts, so a missing login, no network on the compute nodes or
`HF_HUB_OFFLINE` fail in the first seconds, not after the training; the upload at the end sends the output folder
without what only a resume needs (checkpoints, latent caches).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from sketch2real.cli import LOCK_FILE, UserError
from sketch2real.training.accelerator import main_process_view

logger = logging.getLogger("sketch2real")

# what stays local: resume state and caches, not part of the model (diffusers' scripts push their checkpoints too);
# huggingface_hub's patterns (fnmatch over the whole path: `*` crosses folders), also a sequential run's stages' own
LOCAL_ONLY = ("checkpoint-*", "*/checkpoint-*", "latent_cache/*", "*/latent_cache/*", "PREEMPTED", "*/PREEMPTED",
              LOCK_FILE, f"*/{LOCK_FILE}")
LOGIN_HINT = ("log in with `hf auth login` or set HF_TOKEN; compute nodes without a network: train without "
              "--push_to_hub, then `hf upload REPO OUTPUT_DIR` from a login node")


def default_repo_name(output_dir: str) -> str:
    """The repository's name when `--hub_model_id` is not given: the output folder's, as diffusers' scripts name it."""
    return Path(output_dir).resolve().name


@functools.cache
def _created_repo(wanted: str) -> str:
    from huggingface_hub import HfApi

    try:
        return HfApi().create_repo(wanted, exist_ok=True, repo_type="model").repo_id
    except Exception as err:  # noqa: BLE001 - HTTP, offline mode, a bad name: each is the user's to fix
        raise UserError(f"--push_to_hub: cannot create or find the hub repository {wanted!r}: {_reason(err)} "
                        f"({LOGIN_HINT})") from None


def hub_repo_id(opts) -> str:
    """The run's repository as `namespace/name` (created if missing; once per process): `--hub_model_id`, or the
    output folder's name under the logged-in user."""
    return _created_repo(opts.hub_model_id or default_repo_name(opts.output_dir))


def check_hub_repo(opts, accelerator) -> None:
    """With `--push_to_hub`, the repository created or found now, before any weight loads: a missing login or no
    network is one line on every process at once."""
    if opts.push_to_hub:
        main_process_view(accelerator, lambda: hub_repo_id(opts))


def push_output(accelerator, opts, folder: Path, message: str) -> None:
    """One commit of `folder` but what stays local (`LOCAL_ONLY`) to the run's repository, from the main process. A
    failure is one line on every process, saying that the model is saved and how to upload it by hand."""

    def push() -> None:
        from huggingface_hub import HfApi

        repo_id = hub_repo_id(opts)
        try:
            url = HfApi().upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message,
                                        ignore_patterns=list(LOCAL_ONLY)).commit_url
        except Exception as err:  # noqa: BLE001 - the trained model is saved; the upload is the user's to redo
            excluded = " ".join(f"--exclude '{pattern}'" for pattern in LOCAL_ONLY)
            raise UserError(f"--push_to_hub: the upload to {repo_id} failed: {_reason(err)}; the model is saved in "
                            f"{folder}: `hf upload {repo_id} {folder} {excluded}` retries it") from None
        logger.info("pushed %s to %s", folder, url)

    main_process_view(accelerator, push)


def _reason(err: Exception) -> str:
    """What went wrong, in one line: the hub's own message with its HTTP status, else the error's first line."""
    response, message = getattr(err, "response", None), getattr(err, "server_message", None)
    if response is not None and message:
        return f"HTTP {response.status_code}, {' '.join(message.split())}"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
