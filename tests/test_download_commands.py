"""The download commands the services print when a model cannot be found or a weights file is broken (and the docs
repeat: tests/test_readme_examples.py holds them to it) download what the service needs, as the command-line tools
themselves read them. Nothing is downloaded: ``hf`` is huggingface_hub's own command-line app, the pinned one, run
with its two download functions replaced by a recorder; ModelScope's CLI is not installed, so its ``download``
command's documented syntax stands in for it (``modelscope_download``)."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.cli.download as hf_download_command
import pytest
from huggingface_hub.cli.hf import app as hf_app
from huggingface_hub.utils._paths import filter_repo_objects  # what snapshot_download filters with

from common.loading import RANDOM_WEIGHTS_MARKER, BrokenWeights, explain_broken_weights
from qwen3_embed import DOWNLOAD_HELP as TEXT_HELP
from qwen3_embed import text_encoder_files
from siglip2_embed import DOWNLOAD_HELP as IMAGE_HELP

# The parts of Z-Image-Turbo's repository the text service never reads: the image generator (20+ GB).
GENERATOR_FILES = [
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
]
REPOSITORY_EXTRAS = [".gitattributes", "README.md"]


@dataclass(frozen=True)
class Download:
    """What a download command asked for: None for the patterns means every file of the repository."""

    repo_id: str
    allow: list[str] | None
    ignore: list[str] | None
    force: bool

    def of(self, files: list[str]) -> set[str]:
        """The files of a repository this download takes (fnmatch patterns, as both hubs' clients read them)."""
        return set(filter_repo_objects(files, allow_patterns=self.allow, ignore_patterns=self.ignore))


def hf_download(args: list[str]) -> Download:
    """What ``hf download ARGS`` would download, as the pinned huggingface_hub's own parser and download command
    decide. Its warnings are errors: "Ignoring `--include` since filenames have been explicitly set" is how it says
    that a pattern was taken for a file name."""
    asked: list[Download] = []

    def snapshot_download(**kwargs: Any) -> str:
        asked.append(
            Download(kwargs["repo_id"], kwargs["allow_patterns"], kwargs["ignore_patterns"], kwargs["force_download"])
        )
        return "/nowhere"

    def hf_hub_download(**kwargs: Any) -> str:
        asked.append(Download(kwargs["repo_id"], [kwargs["filename"]], None, kwargs["force_download"]))
        return "/nowhere"

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("error")
        patch.setattr(hf_download_command, "snapshot_download", snapshot_download)
        patch.setattr(hf_download_command, "hf_hub_download", hf_hub_download)
        hf_app(args=["download", *args], prog_name="hf", standalone_mode=False)
    (request,) = asked
    return request


def modelscope_download(args: list[str]) -> Download:
    """What ``modelscope download ARGS`` would download, by that command's syntax: the repository id, then file
    names (only those are downloaded, and ``--include`` is ignored), or else ``--include`` with one or more glob
    patterns (``--exclude`` likewise); the folder is ``--local_dir`` (older releases know only that spelling, newer
    ones still accept it). An option it does not know is refused, as it is there."""
    parser = argparse.ArgumentParser(prog="modelscope download")
    parser.add_argument("repo_id")
    parser.add_argument("files", nargs="*")
    parser.add_argument("--include", nargs="+")
    parser.add_argument("--exclude", nargs="+")
    parser.add_argument("--local_dir")
    parsed = parser.parse_args(args)
    if parsed.files:
        return Download(parsed.repo_id, parsed.files, None, False)
    return Download(parsed.repo_id, parsed.include, parsed.exclude, False)


CLIS: dict[str, Callable[[list[str]], Download]] = {"hf": hf_download, "modelscope": modelscope_download}


def commands(help_text: str) -> list[list[str]]:
    """The words of each command of a service's download help: one a line, alternatives as ``# or:`` comments."""
    return [shlex.split(line.strip().removeprefix("# or:")) for line in help_text.splitlines()]


def download(words: list[str]) -> Download:
    """What a download command would download, as its CLI reads it."""
    assert words[1:2] == ["download"] and words[0] in CLIS, f"not a download command of a CLI we know: {words}"
    return CLIS[words[0]](words[2:])


def downloads(help_text: str) -> list[tuple[str, Download]]:
    return [(words[0], download(words)) for words in commands(help_text)]


def files_of(folder: Path) -> list[str]:
    """A model folder's files as a repository lists them; the marker of a tiny model is no file of a real one."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and path.name != RANDOM_WEIGHTS_MARKER
    )


def test_the_image_services_commands_download_the_whole_repository(tiny_siglip: Path) -> None:
    repository = [*files_of(tiny_siglip), *REPOSITORY_EXTRAS]
    found = downloads(IMAGE_HELP)
    assert {cli for cli, _ in found} == {"hf", "modelscope"}
    for cli, asked in found:
        assert asked.repo_id == "google/siglip2-so400m-patch16-512", cli
        assert asked.of(repository) == set(repository), cli


def test_the_text_services_commands_download_its_text_encoder_and_tokenizer(tiny_zimage: Path) -> None:
    """Every file the service reads of a Z-Image-Turbo folder (text_encoder/, tokenizer/, model_index.json) and none
    of the image generator's: the same files as the service's own download at start-up takes."""
    needed = files_of(tiny_zimage)
    assert any(name.startswith("text_encoder/") for name in needed) and any(
        name.startswith("tokenizer/") for name in needed
    )
    repository = [*needed, *GENERATOR_FILES, *REPOSITORY_EXTRAS]
    patterns = text_encoder_files(repository)
    assert patterns is not None
    at_start = set(filter_repo_objects(repository, allow_patterns=patterns))
    found = downloads(TEXT_HELP)
    assert {cli for cli, _ in found} == {"hf", "modelscope"}
    for cli, asked in found:
        assert asked.repo_id == "Tongyi-MAI/Z-Image-Turbo", cli
        assert asked.of(repository) == set(needed) == at_start, cli


def test_the_broken_weights_hint_names_an_option_of_the_command(tiny_siglip: Path, tmp_path: Path) -> None:
    """The hint for a file in the Hugging Face cache (add --force-download to the hf download command) names an
    option of that command, which downloads the same files again."""
    folder = shutil.copytree(tiny_siglip, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BrokenWeights) as broken, explain_broken_weights(folder, IMAGE_HELP):
        raise RuntimeError("incomplete metadata")
    hint = re.search(r"add (--[\w-]+) to the (\w+) download command", str(broken.value))
    assert hint is not None, str(broken.value)
    option, cli = hint.groups()
    found = [words for words in commands(IMAGE_HELP + "\n" + TEXT_HELP) if words[0] == cli]
    assert len(found) == 2
    for words in found:
        plain, forced = download(words), download([*words, option])
        assert forced.force and not plain.force
        assert (forced.allow, forced.ignore) == (plain.allow, plain.ignore)


@pytest.mark.parametrize(
    ("command", "error", "says"),
    [
        # The patterns after the first are file names to hf, which then ignores --include: no text_encoder/.
        (
            "hf download Tongyi-MAI/Z-Image-Turbo --include 'text_encoder/*' 'tokenizer/*' model_index.json "
            "--local-dir m",
            UserWarning,
            "Ignoring `--include`",
        ),
        # huggingface_hub 1.0 and later install only hf.
        ("huggingface-cli download Tongyi-MAI/Z-Image-Turbo --local-dir m", AssertionError, "not a download command"),
        # The whole repository, the image generator too.
        ("modelscope download Tongyi-MAI/Z-Image-Turbo --local_dir m", AssertionError, "transformer/"),
        ("modelscope download Tongyi-MAI/Z-Image-Turbo --include 'text_encoder/*' --local-dir m", SystemExit, "2"),
    ],
    ids=["hf-patterns-as-files", "huggingface-cli", "modelscope-everything", "modelscope-local-dir"],
)
def test_a_wrong_command_is_caught(tiny_zimage: Path, command: str, error: type[BaseException], says: str) -> None:
    needed = set(files_of(tiny_zimage))
    with pytest.raises(error, match=re.escape(says)):
        for _cli, asked in downloads(command):
            taken = asked.of([*needed, *GENERATOR_FILES])
            assert taken == needed, sorted(taken - needed)
