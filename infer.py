"""Ask a Qwen3-VL checkpoint about images, video or text.

    python infer.py --checkpoint=workdir --image=cat.png --prompt="What colour is the circle?"
    python infer.py --checkpoint=Qwen3-VL-2B-Instruct --video=frames_dir --prompt="What happens?"
    python infer.py --checkpoint=DIR --input=prompts.jsonl --output=answers.jsonl
    python infer.py --checkpoint=DIR --interactive

DIR is a Hugging Face Qwen3-VL directory or a train.py work directory. --input lines are {"prompt": ...,
"image": path or [paths], "video": path, "system": ...} (paths relative to the file); --output gets the same
objects with "answer" added, --batch_size prompts decoded together. Answers to --prompt and in --interactive are
streamed as they are produced; --interactive keeps the conversation and its KV cache between turns. Greedy by
default; --temperature / --top_k / --top_p / --seed sample.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "HF Qwen3-VL directory or train.py work directory", required=True)
flags.DEFINE_multi_string("image", [], "image file (repeat for several)")
flags.DEFINE_multi_string("video", [], "video: a directory of frames, a GIF, or a video file")
flags.DEFINE_string("prompt", None, "the question")
flags.DEFINE_string("system", None, "system message")
flags.DEFINE_string("input", None, "JSONL of prompts to answer in turn")
flags.DEFINE_string("output", None, "JSONL to write the answers to (with --input)")
flags.DEFINE_bool("interactive", False, "chat in the terminal; the conversation is kept between turns")
flags.DEFINE_integer("max_new_tokens", 128, "at most this many new tokens per answer")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_integer("top_k", None, "sample from the k most likely tokens")
flags.DEFINE_float("top_p", None, "sample from the smallest set of tokens with this much probability")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_multi_string("stop", [], "stop the answer at this string (repeatable)")
flags.DEFINE_string("dtype", None, "compute dtype (default float32; bfloat16 halves memory)")
flags.DEFINE_enum("kv_cache", "auto", ["auto", "int8"], "KV cache storage: the compute dtype, or int8 with "
                  "per-(slot, head) scales (about half of bfloat16's memory)")
flags.DEFINE_integer("batch_size", 8, "--input prompts decoded together")
flags.DEFINE_list("exit_layers", [], "early exit: decoder layers after which a confident token may stop")
flags.DEFINE_float("exit_threshold", 1.0, "early exit: top next-token probability above which a token stops "
                   "(1.0 = never: the full model's outputs)")
flags.DEFINE_float("vision_token_ratio", None, "vision-token merging: the fraction of each image's tokens the "
                   "LLM sees (default: the checkpoint's setting, 1.0 = off)")


def _as_list(x) -> list:
  return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # answers on stdout, not kernel-choice and checkpoint logs
  import jax
  from qwen3vl.infer.assistant import Assistant, user_turn

  assistant = Assistant(FLAGS.checkpoint, dtype=FLAGS.dtype, kv_cache=FLAGS.kv_cache)
  runtime = {}
  if FLAGS.exit_layers:
    runtime.update(exit_layers=tuple(int(i) for i in FLAGS.exit_layers), exit_threshold=FLAGS.exit_threshold)
  if FLAGS.vision_token_ratio is not None:
    runtime.update(vision_token_ratio=FLAGS.vision_token_ratio)
  if runtime:
    from qwen3vl.model.vlm import with_runtime
    assistant.model = with_runtime(assistant.model, **runtime)
  options = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                 top_p=FLAGS.top_p, stop_strings=FLAGS.stop)
  key = jax.random.key(FLAGS.seed)

  def rng():
    nonlocal key
    key, sub = jax.random.split(key)
    return sub

  def show(text):
    print(text, end="", flush=True)

  system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
  if FLAGS.input:
    _answer_file(assistant, system, options, rng)
  elif FLAGS.interactive:
    conversation = assistant.chat(FLAGS.system)
    images, videos = list(FLAGS.image), list(FLAGS.video)  # shown with the first message
    print(f"{FLAGS.checkpoint} ({assistant.source}); an empty line or Ctrl-D ends the chat.")
    while True:
      try:
        text = input("you> ").strip()
      except EOFError:
        break
      if not text:
        break
      print("assistant> ", end="", flush=True)
      conversation.say(text, images, videos, stream=show, rng=rng(), **options)
      print(flush=True)
      images, videos = [], []
  elif FLAGS.prompt:
    messages = system + [user_turn(FLAGS.prompt, len(FLAGS.image), len(FLAGS.video))]
    assistant.reply(messages, FLAGS.image, FLAGS.video, stream=show, rng=rng(), **options)
    print(flush=True)
  else:
    raise app.UsageError("give --prompt, --input or --interactive")


def _answer_file(assistant, system, options, rng):
  """--input records answered --batch_size at a time, written (in order) to --output or stdout."""
  from qwen3vl.infer.assistant import user_turn
  base = os.path.dirname(os.path.abspath(FLAGS.input))
  records, conversations = [], []
  with open(FLAGS.input) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      if "prompt" not in record:
        raise ValueError(f"{FLAGS.input}:{n}: no \"prompt\" field")
      images = [os.path.join(base, p) for p in _as_list(record.get("image") or record.get("images"))]
      videos = [os.path.join(base, p) for p in _as_list(record.get("video") or record.get("videos"))]
      sys_msg = [{"role": "system", "content": record["system"]}] if record.get("system") else system
      records.append(record)
      conversations.append((sys_msg + [user_turn(record["prompt"], len(images), len(videos))], images, videos))
  out = open(FLAGS.output, "w") if FLAGS.output else sys.stdout
  try:
    for start in range(0, len(records), FLAGS.batch_size):
      stop = start + FLAGS.batch_size
      for record, reply in zip(records[start:stop],
                               assistant.replies(conversations[start:stop], rng=rng(), **options)):
        record["answer"] = reply.text
        print(json.dumps(record), file=out, flush=True)
  finally:
    if out is not sys.stdout:
      out.close()


def run():
  try:
    app.run(main)
  except (FileNotFoundError, ValueError, OSError) as e:  # bad input: one clear line, no traceback wall
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  from qwen3vl.host_malloc import reexec_with_tuned_malloc
  reexec_with_tuned_malloc()
  run()
