"""``python -m dynamax_jax.generate`` on the shipped small Mamba2 and its exit heads."""

import importlib

from dynamax_jax.assets import ASSET_DIR, asset_path

G = importlib.import_module("dynamax_jax.generate")


def test_cli_streams_text_and_prints_savings(capsys):
    model = str(asset_path("mamba2-small"))
    exits = str(ASSET_DIR / "exits" / "mamba2-small-calm")
    assert G.main(["--model", model, "--exits", exits, "--threshold", "0", "--max-new-tokens", "6",
                   "--chunk", "3", "The function returns"]) == 0
    out = capsys.readouterr()
    assert out.out.strip()  # the generated text
    # threshold 0: every token leaves at the first exit (layer 5 of 8)
    assert "average layers 5.00 of 8" in out.err and "% of full depth" in out.err

    assert G.main(["--model", model, "--max-new-tokens", "4", "The function returns"]) == 0
    assert "average layers 8.00 of 8" in capsys.readouterr().err  # another model: full depth by default
