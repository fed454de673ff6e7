"""infer.py and the Assistant on a train.py work directory: loads the newest checkpoint, answers through the chat
template and image processor, JSONL in / out, and bad inputs give one clear error line."""
import json
import os
import subprocess
import sys

import pytest

from qwen3vl.configs import moe
from qwen3vl.data.synthetic import make_record
from qwen3vl.infer.assistant import Assistant, user_turn
from qwen3vl.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  c = moe.get_config()
  c.data.batch_size, c.data.max_length, c.data.max_patches, c.data.synthetic_eval_size = 2, 64, 64, 4
  c.train.update({"steps": 2, "eval_every": 1000, "eval_batches": 1, "checkpoint_every": 1000})
  trainer.train(c, str(path))
  return path


def test_assistant_answers_from_a_workdir(workdir):
  assistant = Assistant(str(workdir))
  record = make_record("eval", 0)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
  reply = assistant.reply(messages, record["images"], max_new_tokens=5)
  assert isinstance(reply.text, str) and reply.prompt_tokens > 4  # 4 image tokens plus the template
  assert len(reply.token_ids) <= 5 and not set(reply.token_ids) & set(assistant.stop_ids)
  with pytest.raises(FileNotFoundError, match="neither"):
    Assistant(str(workdir / "checkpoints"))


def test_cli_jsonl_and_errors(workdir, tmp_path):
  make_record("eval", 1)["images"][0].save(tmp_path / "a.png")
  with open(tmp_path / "in.jsonl", "w") as f:
    f.write(json.dumps({"prompt": "Which shape is shown?", "image": "a.png"}) + "\n")
    f.write(json.dumps({"prompt": "Say hi."}) + "\n")
  run = lambda *flags: subprocess.run([sys.executable, "infer.py", f"--checkpoint={workdir}", "--max_new_tokens=4",
                                       *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
  out = run(f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}")
  assert out.returncode == 0, out.stderr[-2000:]
  answers = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
  assert [a["prompt"] for a in answers] == ["Which shape is shown?", "Say hi."]
  assert all(isinstance(a["answer"], str) for a in answers)
  bad = run("--image=/nonexistent.png", "--prompt=x")
  assert bad.returncode == 1 and "error: image file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_keeps_its_cache_and_streams(workdir):
  """Turn 2 of a Chat writes only its new tokens after the cache and answers as a one-shot generate over the
  whole token history; streamed pieces add up to the reply text, stop strings included."""
  import numpy as np
  from qwen3vl.infer.generate import generate
  assistant = Assistant(str(workdir))
  image = make_record("eval", 2)["images"]
  conversation = assistant.chat("Be brief.")
  pieces = []
  one = conversation.say("What colour?", image, max_new_tokens=6, stream=pieces.append)
  assert "".join(pieces) == one.text
  two = conversation.say("And the shape?", max_new_tokens=6)
  tok = assistant.tokenizer
  user = lambda text, n: [user_turn(text, n)]
  first = assistant.inputs([{"role": "system", "content": "Be brief."}] + user("What colour?", 1), image)
  closing = [assistant.im_end] + tok.encode("\n")  # what the template puts after an answer
  second = assistant.inputs(user("And the shape?", 0))["input_ids"][0].tolist()
  history = first["input_ids"][0].tolist() + one.token_ids + closing + second
  carried = len(one.token_ids) == 6  # no stop token: the last answer token was not in the cache yet
  assert two.prompt_tokens == carried + len(closing) + len(second)
  want = generate(assistant.model, np.asarray([history], np.int32), pixel_values=first["pixel_values"],
                  image_grid_thw=first["image_grid_thw"], max_new_tokens=6, stop_ids=assistant.stop_ids,
                  pad_id=assistant.pad_id)[0]
  assert two.token_ids == [int(t) for t in want[:len(two.token_ids)]]
  stopped = []
  cut = assistant.reply(user("What colour?", 1), image, max_new_tokens=6, stream=stopped.append,
                        stop_strings=[one.text[2:4]] if len(one.text) >= 4 else ["\x00"])
  assert "".join(stopped) == cut.text


def test_cli_interactive_and_streaming(workdir):
  run = subprocess.run([sys.executable, "infer.py", f"--checkpoint={workdir}", "--max_new_tokens=3", "--interactive",
                        "--kv_cache=int8"], cwd=ROOT, input="hi\nmore\n\n", capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.count("assistant> ") == 2
