"""model.lora: off by default, and the settings that cannot work are refused with the key named."""

import pytest
from pydantic import ValidationError

from sdpo.recipe import load_config


def test_lora_is_off_by_default_and_validated():
    assert not load_config(None, []).model.lora.enabled
    lora = load_config(None, ["model.lora.enabled=true", "model.lora.rank=8"]).model.lora
    assert lora.rank == 8 and lora.alpha == 32 and "q_proj" in lora.target_modules
    for overrides, words in [(["model.lora.rank=0"], "rank"), (["model.lora.target_modules=[]"], "target_modules"),
                             (["model.lora.target_modules=[lm_head]"], "lm_head"),
                             (["model.lora.dropout=1.0"], "dropout"),
                             (["model.lora.enabled=true", "model.lora.weight_sync=adapter", "rollout.max_staleness=1"],
                              "max_staleness")]:
        with pytest.raises((ValidationError, ValueError), match=words):
            load_config(None, overrides)
