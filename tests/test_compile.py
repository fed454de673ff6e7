"""The real train step and generate program compiled for chips we do not have (qwen3vl.tools.compile): tiny dense
and MoE on v5e:2x4 (FSDP 8) and h100:8 (tensor 2 x FSDP 4) with the Pallas kernels forced. From the compiled
per-device HLO: every kernel call takes its device's share (batch / batch shards, heads / tensor, the vision
patches / batch shards) and no all-gather feeds a kernel's queries. Skipped with the reason where libtpu / the
CUDA plugin are absent; the CLI's table and exit codes are checked on simulated CPU devices."""
import os
import re
import subprocess
import sys

import pytest

from targets_util import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, LENGTH, PATCHES = 16, 64, 1024
MESHES = {"v5e:2x4": dict(data=1, fsdp=-1, tensor=1), "h100:8": dict(data=1, fsdp=4, tensor=2)}
IMPL = {"v5e:2x4": "pallas_tpu", "h100:8": "pallas_gpu"}


def _config(preset_file, target_name):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", preset_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  with c.unlocked():
    c.mesh.update(MESHES[target_name])
    c.data.batch_size, c.data.max_length, c.data.max_patches = BATCH, LENGTH, PATCHES
    c.model.attention_impl = IMPL[target_name]
  return c


def _check_kernels(row, target_name, text_heads, vision_heads):
  from qwen3vl.tools.compile import feeding_ops, parse_instructions, tensor_operands
  instructions = parse_instructions(row["hlo"])
  mesh = MESHES[target_name]
  shards = 8 // mesh["tensor"]
  tensor = mesh["tensor"]
  calls = row["kernels"]
  assert {c[1] for c in row["choices"]} == {IMPL[target_name]}, row["choices"]
  assert len(calls) >= 2, "no kernel in the compiled program"
  seen = set()
  attention_calls = [c for c in calls if IMPL[target_name] != "pallas_tpu" or c["name"].startswith("pallas_tpu_flash")]
  assert attention_calls, [c["name"] for c in calls]
  for call in attention_calls:  # (on TPU the MoE's ragged_dot is a Mosaic kernel too)
    q = [int(n) for n in tensor_operands(call)[0].split("[")[1].rstrip("]").split(",")]
    if IMPL[target_name] == "pallas_tpu":  # kernel layout [B, H, L, D]
      b, h, rows = q[0], q[1], q[2]
    else:  # [B, L, H, D]
      b, rows, h = q[0], q[1], q[2]
    if b == 1:  # the vision tower's packed patches
      seen.add("vision")
      assert rows == PATCHES // shards and h == vision_heads // tensor, (call["name"], q)
    else:
      seen.add("text")
      assert b == BATCH // shards and h == text_heads // tensor, (call["name"], q)
    assert "all-gather" not in feeding_ops(instructions, call["operand_names"][call["operands"].index(
        tensor_operands(call)[0])]), f"an all-gather feeds {call['name']}'s queries"
  assert seen == {"text", "vision"}, seen


@pytest.mark.parametrize("target_name", ["v5e:2x4", "h100:8"])
@pytest.mark.parametrize("preset_file", ["dense.py", "moe.py"])
def test_train_and_generate_compile_with_kernels_per_device(target_name, preset_file, tmp_path):
  from qwen3vl.tools import compile as tool
  target = need(target_name)
  config = _config(preset_file, target_name)
  rows = tool.run(config, target, ["train", "generate"], max_new_tokens=8, hlo_dir=str(tmp_path))
  for row in rows:
    with open(tmp_path / f"{row['step']}.hlo.txt") as f:
      row["hlo"] = f.read()
    assert row["fits"] and row["peak"] > row["params"] > 0, row
    _check_kernels(row, target_name, config.model.text.num_attention_heads, config.model.vision.num_heads)
  assert rows[0]["optimizer"] > rows[0]["params"] and rows[1]["cache"] > 0
  if preset_file == "moe.py":  # TPU's grouped-matmul kernel; XLA:GPU would expand ragged_dot to every expert
    assert config.model.moe_impl == {"v5e:2x4": "ragged", "h100:8": "blocked"}[target_name]


def test_cli_prints_the_table_and_exit_codes():
  """On simulated CPU devices: exit 0 and the table when it fits, 2 with the verdict when it does not."""
  base = [sys.executable, "-m", "qwen3vl.tools.compile", "--config=configs/dense.py", "--target=cpu:2",
          "--config.mesh.fsdp=2", "--config.data.batch_size=2", "--config.data.max_length=64",
          "--config.data.max_patches=256"]
  ok = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "step (MiB/device)" in ok.stdout and "fits" in ok.stdout and "attention -> xla" in ok.stdout, ok.stdout
  small = subprocess.run(base + ["--hbm_gib=0.001"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert small.returncode == 2 and "does not fit" in small.stdout, small.stdout + small.stderr[-2000:]
  bad = subprocess.run(base[:4] + ["--target=z100:8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "z100:8" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.parametrize("target_name", ["v5p:2x2x2", "h100:8"])
def test_moe_all_to_all_sends_copies_without_gathering_them(target_name, tmp_path):
  """Tiny MoE train step with expert=8: the all_to_all dispatch compiles to XLA's ragged all-to-all and no
  all-gather has the expert group's token rows ([8 x local tokens, ...]: what the all_gather dispatch gathers, the
  control on h100:8); the MoE layer alone (--step=moe_layer) holds fewer temporaries than with all_gather."""
  from qwen3vl.tools import compile as tool
  target = need(target_name)
  length = 80  # 160 tokens a device, 1280 over the expert group: apart from every other dimension here
  rows = {}
  for dispatch in ("all_to_all", "all_gather") if target_name == "h100:8" else ("all_to_all",):
    config = _config("moe.py", "h100:8")
    with config.unlocked():
      config.mesh.update(dict(data=1, fsdp=1, expert=8, tensor=1))
      config.model.moe_dispatch, config.data.max_length = dispatch, length
      config.model.attention_impl = None  # the dispatcher's choice: this test is about the MoE
    row, layer = tool.run(config, target, ["train", "moe_layer"], hlo_dir=str(tmp_path / dispatch))
    instructions = tool.parse_instructions((tmp_path / dispatch / "train.hlo.txt").read_text())
    ops = [(op, shape) for shape, op, _, _ in instructions.values()]
    text = config.model.text
    copies = re.compile(rf"\[{BATCH * length},({text.hidden_size}|{text.num_experts_per_tok})\]")  # rows, ids
    gathered = [s for op, s in ops if op in ("all-gather", "all-gather-start") and copies.search(s)]
    ragged = [s for op, s in ops if op.startswith("ragged-all-to-all")]  # XLA:GPU's is async: -start, -done
    rows[dispatch] = row, layer
    print(target_name, dispatch, f"temporaries {row['temp'] / 2**20:.2f} MiB, MoE layer alone "
          f"{layer['temp'] / 2**20:.2f} MiB", len(ragged), "ragged all-to-all")
    if dispatch == "all_to_all":
      assert row["fits"] and ragged and not gathered, (ragged, gathered)
    else:
      assert gathered and not ragged, "the control's token all-gather was not found: the check above proves nothing"
  assert "all_to_all over expert=8 (ragged_all_to_all, dropless)" in " ".join(rows["all_to_all"][0]["notes"])
  if "all_gather" in rows:  # top-2 of 8 experts over 8 devices: a device can receive 1 copy per token of the
    # group (dropless bound), where the all-gather lays out all 2 of every token: the MoE's own temporaries shrink
    assert rows["all_to_all"][1]["temp"] < rows["all_gather"][1]["temp"], rows
