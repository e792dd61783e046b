"""dashdiff.autolora.report: the rank report's files."""

from __future__ import annotations
import json
import sys

import pytest

from dashdiff import determine_ranks
from dashdiff.autolora import BilevelStep
from dashdiff.autolora.report import INSTALL_HINT, write_rank_report
from autolora_nets import batch, make_net, mse


def test_rank_report(tmp_path, monkeypatch):
    model = make_net()
    s = BilevelStep(model, beta_lr=0.3)
    for i in range(4):
        s.step(batch(i), batch(50 + i), mse)
    ranks = determine_ranks(model)
    paths = write_rank_report(model, tmp_path / "out")
    md = open(paths["md"]).read()
    for name, r in ranks.items():
        assert f"| `{name}` | 4 | {r} |" in md
    rec = json.loads(open(paths["json"]).read())
    assert {l["name"]: l["rank"] for l in rec["layers"]} == ranks and rec["total_rank"] == sum(ranks.values())
    assert all(sum(l["kept"]) == l["rank"] and abs(sum(l["alpha"]) - 1) < 1e-12 for l in rec["layers"])
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the (ranks, alphas) form gives the same table
    from dashdiff import selection_weights

    paths2 = write_rank_report((ranks, selection_weights(model)), tmp_path / "b", plot=False)
    assert open(paths2["md"]).read() == md and "png" not in paths2
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as err:
        write_rank_report(model, tmp_path / "c")
    assert str(err.value) == INSTALL_HINT and "\n" not in INSTALL_HINT
    assert not (tmp_path / "c").exists()
