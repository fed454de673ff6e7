"""Model presets: every released size builds (abstractly) and has the published parameter count."""
import pytest

from qwen3vl.configs import models
from qwen3vl.config import ModelConfig
from qwen3vl.model.vlm import count_params
from qwen3vl.tools import params

# Published sizes (Hugging Face model cards, billions of parameters).
PUBLISHED = {"2b": 2.13, "4b": 4.44, "8b": 8.77, "32b": 33.4, "30b_a3b": 31.1, "235b_a22b": 236.0}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_released_preset_parameter_count(name):
  cfg = ModelConfig.from_dict(models.get_config(name).to_dict())
  total = count_params(cfg)["total"] / 1e9
  assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, total)


def test_moe_active_parameters():
  cfg = ModelConfig.from_dict(models.get_config("30b_a3b").to_dict())
  active = params.active_params(cfg, count_params(cfg)) / 1e9
  assert 3.0 < active < 4.0


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="unknown model preset '3b'"):
    models.get_config("3b")


def test_params_command_prints_a_table(capsys):
  params.main(["tiny_moe"])
  row = capsys.readouterr().out.splitlines()[1].split()
  total = count_params(ModelConfig.from_dict(models.get_config("tiny_moe").to_dict()))["total"]
  assert row[0] == "tiny_moe" and row[1] == f"{total:,}"
