"""Hugging Face hub ids in ``load_pretrained`` / ``load_tokenizer``, against a fake local hub
cache (the ``models--owner--name/snapshots/<commit>/`` + ``refs/main`` layout huggingface_hub
reads, pointed at by ``HF_HUB_CACHE``). Nothing here reaches the network: the tests that
would need the hub replace ``huggingface_hub.snapshot_download`` with a stand-in."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest

import dynamax_jax as dx
from dynamax_jax.convert.checkpoint import CODESTRAL_FILES, HUB_FILES, parse_hub_id
from dynamax_jax.convert.errors import CheckpointError, HubCheckpointError
from tests.test_convert import _assert_same_params as assert_same_params, _tiny_tokenizer

REPO_ID = "owner/tiny-mistral"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, checkpoint: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """A hub cache under ``root`` holding ``checkpoint``'s files as ``repo_id`` at ``commit``
    (branch main)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def checkpoint(save_hf_model):
    _, path = save_hf_model("mistral")
    _tiny_tokenizer(path)
    return path


@pytest.fixture
def offline_cache(checkpoint, tmp_path, monkeypatch):
    cache = fake_cache(tmp_path / "hub-cache", checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_like_the_local_path(checkpoint, offline_cache):
    config, params = dx.load_pretrained(checkpoint)
    for name in (REPO_ID, f"{REPO_ID}@main", f"{REPO_ID}@{COMMIT}"):
        hub_config, hub_params = dx.load_pretrained(name)
        assert hub_config == config
        assert_same_params(hub_params, params)
    assert dx.load_tokenizer(REPO_ID)("w5 w7").input_ids == dx.load_tokenizer(checkpoint)("w5 w7").input_ids


def test_hub_cache_is_found_through_hf_home(checkpoint, tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    fake_cache(home / "hub", checkpoint)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_params(dx.load_pretrained(REPO_ID)[1], dx.load_pretrained(checkpoint)[1])


def test_a_cached_checkpoint_is_used_without_asking_the_hub(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(fake_cache(tmp_path / "hub-cache", checkpoint)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    real = huggingface_hub.snapshot_download
    calls = []

    def cache_only(repo_id, **kwargs):
        calls.append(kwargs)
        assert kwargs["local_files_only"], "asked the hub although the checkpoint is cached"
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    assert_same_params(dx.load_pretrained(REPO_ID)[1], dx.load_pretrained(checkpoint)[1])
    assert calls


def test_downloads_request_only_weights_config_and_tokenizer(checkpoint, tmp_path, monkeypatch):
    """Not cached and online: the hub is asked for the Hugging Face layout and the tokenizer;
    the Codestral release files only for a repository without config.json."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    release = tmp_path / "release"
    release.mkdir()
    requests = []

    def hub(repo_id, local_files_only=False, allow_patterns=None, revision=None, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        requests.append((repo_id, revision, tuple(allow_patterns)))
        return str(checkpoint if repo_id == REPO_ID else release)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    assert_same_params(dx.load_pretrained(f"{REPO_ID}@v1")[1], dx.load_pretrained(checkpoint)[1])
    assert requests == [(REPO_ID, "v1", HUB_FILES)]
    wanted = ("config.json", "model.safetensors", "model.safetensors.index.json",
              "model-00001-of-00003.safetensors", "tokenizer.json", "tokenizer_config.json")
    unwanted = ("pytorch_model.bin", "original/consolidated.00.pth", "model.Q4_K_M.gguf", "README.md",
                "consolidated.safetensors", "flax_model.msgpack")
    assert all(any(fnmatch.fnmatch(f, p) for p in HUB_FILES) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in HUB_FILES)

    requests.clear()
    with pytest.raises(CheckpointError, match="no config.json"):
        dx.load_pretrained("mistralai/release-only")  # the stand-in hub has no files for it
    assert requests == [("mistralai/release-only", None, HUB_FILES),
                        ("mistralai/release-only", None, CODESTRAL_FILES)]


def test_offline_with_nothing_cached_names_the_id(tmp_path, monkeypatch):
    (tmp_path / "empty-cache").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (dx.load_pretrained, dx.load_tokenizer):
        with pytest.raises(HubCheckpointError) as err:
            load("someone/absent-model@v2")
        message = str(err.value)
        assert "'someone/absent-model@v2' is not a local path" in message
        assert "HF_HUB_OFFLINE" in message and str(tmp_path / "empty-cache") in message
        assert "hf download someone/absent-model --revision v2" in message
        assert "local checkpoint directory" in message


def test_unreachable_hub_names_the_id(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    def no_network(repo_id, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(HubCheckpointError, match=r"'someone/model'.*could not be reached.*hf download someone/model"):
        dx.load_pretrained("someone/model")


def test_paths_and_malformed_ids_keep_the_missing_path_error(tmp_path, monkeypatch, checkpoint):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "unused"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (str(tmp_path / "nowhere"), "owner/name/extra", "./owner/name", "owner/model.gguf",
                 "owner//name", "owner/../name", "no-slash", "owner/name@"):
        assert parse_hub_id(name) is None, name
        with pytest.raises(FileNotFoundError, match="does not exist"):
            dx.load_pretrained(name)
    # An existing local directory that reads like an id is a path.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoint, tmp_path / "owner" / "name")
    assert parse_hub_id("owner/name") is None
    assert_same_params(dx.load_pretrained("owner/name")[1], dx.load_pretrained(checkpoint)[1])
    assert parse_hub_id("owner/other@refs/pr/1") == ("owner/other", "refs/pr/1")
