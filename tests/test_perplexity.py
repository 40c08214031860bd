"""eval.perplexity: the held-out documents are never read by a training run of the same seed
that reads less than the rest of the file, and the perplexity is a direct computation's."""

import json

import jax
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax.eval import perplexity as P
from dynamax_jax.train import data as D


def _encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_heldout_documents_are_never_read_by_a_run_of_the_same_seed(tmp_path):
    path = tmp_path / "prose.jsonl"
    docs = [f"<doc {i:03d}> " + "lorem ipsum dolor " * (5 + i % 7) for i in range(120)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    held = P.heldout_documents(path, seed=0, fraction=0.1)
    total = sum(map(len, docs))
    assert held and sum(map(len, held)) <= 0.1 * total
    assert set(held) <= set(docs)
    # a run reading 80 % of the file's tokens, rows shuffled within the trainers' window
    rows = 0.8 * (total + len(docs)) / 32
    it = iter(D.make_dataset(str(path), encode=_encode, eos_id=0, row_len=32, batch_size=1, seed=0,
                             process_index=0, process_count=1, row_shuffle_window=8))
    read = bytes(int(t) for _ in range(int(rows)) for t in next(it)["tokens"][0] if t).decode("utf-8", "ignore")
    assert not any(d[:9] in read for d in held)
    # another seed holds out other documents
    assert P.heldout_documents(path, seed=1, fraction=0.1) != held


def test_mean_nll_is_the_direct_computation():
    config = dx.MistralConfig.tiny(num_layers=2)
    params = dx.init_params(config, jax.random.key(0))
    rows = np.asarray(jax.random.randint(jax.random.key(1), (5, 9), 0, config.vocab_size), np.int32)
    logits = np.asarray(dx.forward(config, params, rows), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    direct = -np.mean([logp[b, t, rows[b, t + 1]] for b in range(5) for t in range(8)])
    assert P.mean_nll(config, params, rows, batch_size=2, progress=False) == pytest.approx(direct, rel=1e-5)


def test_windows_cut_documents_in_order_up_to_the_token_budget():
    rows = P.windows(["abcdefgh", "xy", "ijklmnopq"], _encode, seq_len=4, max_tokens=9)
    assert [bytes(r.tolist()).decode() for r in rows] == ["abcd", "efgh", "ijkl"]
    with pytest.raises(P.SettingsError, match="no window of 16"):
        P.windows(["short"], _encode, seq_len=16, max_tokens=100)


def test_cli_scores_several_models_on_the_same_tokens(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "prose.jsonl"
    path.write_text("".join(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 8}) + "\n"
                            for _ in range(40)))
    out = tmp_path / "ppl.json"
    assert P.main(["--models", str(tiny_llama_dir), str(tiny_llama_dir), "--data", str(path), "--tokens", "200",
                   "--seq-len", "32", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    a, b = result["models"]
    assert a["perplexity"] == b["perplexity"] > 1 and result["scored_tokens"] >= 200
    assert "perplexity 1.0000x" in capsys.readouterr().out
