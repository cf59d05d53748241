"""`--checkpoint hf:REPO[/FILE]`: a SAM 2 checkpoint from the Hugging Face hub, through
huggingface_hub's local cache (HF_HOME / HF_HUB_CACHE), downloaded only when not cached.

REPO may hold the original `*.pt` (facebook/sam2.1-hiera-tiny) or a transformers folder
(`config.json` + `model.safetensors`); the transformers layout is taken when both are there.
"""

from __future__ import annotations

import fnmatch
import os

from convert.torch_io import CheckpointError

PREFIX = "hf:"
_HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors")


def _choose(files: list[str], spec: str, wanted: str | None) -> list[str]:
    """The files of the repo to read: FILE when given, else the transformers layout, else the one .pt."""
    if wanted is not None:
        if wanted not in files:
            raise CheckpointError(f"{spec}: the repo has no file {wanted!r} (it has: {', '.join(sorted(files))})")
        return [wanted]
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return [f for f in files if any(fnmatch.fnmatch(f, p) for p in _HF_FILES)]
    pts = sorted(f for f in files if f.endswith((".pt", ".pth")))
    if len(pts) == 1:
        return pts
    if not pts:
        raise CheckpointError(f"{spec}: no .pt file and no config.json + model.safetensors in the repo")
    raise CheckpointError(f"{spec}: several checkpoints ({', '.join(pts)}); name one, e.g. {spec}/{pts[0]}")


def _path(folder: str, chosen: list[str]) -> str:
    return os.path.join(folder, chosen[0]) if chosen[0].endswith((".pt", ".pth")) else folder


def _cached_files(folder: str) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names]


def resolve(spec: str) -> str:
    """hf:REPO[/FILE] -> a local .pt file or transformers folder, from the cache when it holds one."""
    from huggingface_hub import HfApi, constants, snapshot_download

    parts = spec[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"{spec}: expected hf:OWNER/NAME or hf:OWNER/NAME/FILE")
    repo, wanted = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        folder = snapshot_download(repo, local_files_only=True)
        return _path(folder, _choose(_cached_files(folder), spec, wanted))
    except (FileNotFoundError, CheckpointError):
        pass  # not cached (or cached without the files needed): fetch what is missing
    try:
        chosen = _choose(HfApi().list_repo_files(repo), spec, wanted)
        folder = snapshot_download(repo, allow_patterns=chosen)
    except CheckpointError:
        raise
    except Exception as e:  # offline, no network, unknown repo: one line saying what to fetch, and where
        cause = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        cache = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
        raise CheckpointError(
            f"{spec}: not in the Hugging Face cache and not downloadable here ({cause}); on a machine with "
            f"network run `hf download {repo}` and copy {cache} to the same place here (or set HF_HOME), "
            "or pass the downloaded .pt file or transformers folder as --checkpoint"
        ) from None
    return _path(folder, chosen)
