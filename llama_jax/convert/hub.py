"""Hugging Face Hub repo ids ("ORG/NAME") where a local folder is expected: downloaded into the standard
HF cache with the user's token (safetensors, config and tokenizer files only: never a .bin/.pth pickle,
which could run code), and every failure (offline, gated, not found) said in one line."""

from __future__ import annotations

import glob
import os

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
KINDS = {  # what each kind of source needs from a repo's top folder (subfolders such as original/ never)
    "model": ("config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
              *TOKENIZER_FILES),
    "tokenizer": TOKENIZER_FILES,
}
LOGIN = "`hf auth login` (huggingface_hub before 1.0: `huggingface-cli login`) or the HF_TOKEN environment variable"


class HubError(OSError):
    """A Hub download that cannot be done, said in one line (the CLIs print it and exit 2)."""


def is_repo_id(source: str) -> bool:
    """True for a string that can only mean a Hub repo: ORG/NAME that is not a local path (nothing at
    `source`, and no local folder ORG) nor a URL."""
    text = os.fspath(source)
    if "://" in text or os.path.exists(text) or text.count("/") != 1 or text.startswith((".", "~")):
        return False
    if os.path.isdir(text.split("/")[0]):  # data/tokenizer.model: a local path with a typo, not a repo
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve(source: str, kind: str = "model", revision: str | None = None) -> str:
    """A local path or URL as it is (a local path that exists always wins); a Hub repo id -> the local
    snapshot folder in the HF cache, downloading what `kind` needs first.

    kind "model": config.json + safetensors weights (+ index) + tokenizer files; "tokenizer": the
    tokenizer files only. `revision`: a branch, tag or commit (default: main). Raises HubError.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    source = os.fspath(source)
    if not is_repo_id(source):
        if revision is not None and not os.path.exists(source):
            raise HubError(f"--revision {revision}: {source} is neither a local path nor a Hub repo id (ORG/NAME)")
        return source
    import huggingface_hub
    from huggingface_hub import errors

    try:
        folder = huggingface_hub.snapshot_download(source, revision=revision, allow_patterns=list(KINDS[kind]),
                                                   ignore_patterns=["*/*"], library_name="llama_jax")
    except errors.GatedRepoError:
        raise HubError(f"{source}: a gated repo your account may not download yet (HTTP 401/403): accept its "
                       f"license at https://huggingface.co/{source} with your account, then log in here with "
                       f"{LOGIN}") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{source}: no such local path, and no such repo on the Hugging Face Hub (a private repo "
                       f"needs a login: {LOGIN})") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{source}: the Hub repo has no revision {revision!r} (a branch, tag or commit)") from None
    except errors.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE
               else "the Hugging Face Hub cannot be reached")
        raise HubError(f"{source}: not in the local Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
                       f"and {why}; download it once with network access, or pass a local folder") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{source}: the Hugging Face Hub refused the download ({' '.join(str(e).split())})") from None
    _check_snapshot(source, folder, kind)
    return folder


def _check_snapshot(repo: str, folder: str, kind: str) -> None:
    """Say what a downloaded repo lacks, rather than let the converter fail on a cache folder path."""
    if kind == "tokenizer":
        if not any(os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer.model", "tokenizer.json")):
            raise HubError(f"{repo}: the Hub repo has no tokenizer.model or tokenizer.json in its top folder")
        return
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise HubError(f"{repo}: the Hub repo has no config.json in its top folder: not a transformers model")
    if not glob.glob(os.path.join(folder, "*.safetensors")):
        raise HubError(f"{repo}: the Hub repo has no safetensors weights in its top folder; llama_jax never "
                       "downloads .bin/.pth pickles (they can run code): download them yourself if you trust "
                       "them and convert the local folder")
