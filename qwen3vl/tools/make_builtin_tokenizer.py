"""Builds qwen3vl/data/builtin_tokenizer.json, the tokenizer a run uses when its config names none.

    python -m qwen3vl.tools.make_builtin_tokenizer [--check]

A byte-level BPE (the GPT-2 byte alphabet, so any text encodes losslessly) whose merges `tokenizers`' BpeTrainer
learns from the chat template's scaffolding, the synthetic set's questions and answers, and a few hundred common
English words. Why merges at all: with bytes alone a synthetic question-answer sample is ~60 tokens, with these
merges ~20, so a CPU run sees three times the samples for the same compute. Ids: byte b is id b, the Qwen
special tokens are 256..263 (so tiny model configs name fixed ids), merged tokens follow; 512 ids in all.
`--check` rebuilds in memory and fails if the committed file differs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from qwen3vl.data import synthetic
from qwen3vl.data.tokenizer import BUILTIN_PATH, QWEN_SPECIAL_TOKENS, byte_table

VOCAB_SIZE = 512

COMMON_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by hot
word but what some we can out other were all there when up use your how said an each she which do their time if
will way about many then them write would like so these her long make thing see him two has look more day could
go come did number sound no most people my over know water than call first who may down side been now find any
new work part take get place made live where after back little only round man year came show every good me give
our under name very through just form sentence great think say help low line differ turn cause much mean before
move right boy old too same tell does set three want air well also play small end put home read hand port large
spell add even land here must big high such follow act why ask men change went light kind off need house picture
try us again animal point mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye never last let thought
city tree cross farm hard start might story saw far sea draw left late run don't while press close night real
life few north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color colour face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door product
black short numeral class wind question happen complete ship area half rock order fire south problem piece told
knew pass since top whole king space heard best hour better true during hundred five remember step early hold
west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war
lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct
able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat common gold possible plane
image video describe shown assistant user system yes photo frame blue yellow purple orange circle square triangle
"""


def corpus():
  """Texts the trainer counts pairs in: chat scaffolding and synthetic QA weighted up, then common words."""
  for _ in range(50):
    yield "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    yield "<|im_end|>\n<|im_start|>assistant\n"
  for kind, templates in synthetic.TEMPLATES.items():
    for template in templates:
      for shape in synthetic.SHAPES:
        for _ in range(20):
          yield template.format(shape=shape)
  answers = list(synthetic.COLOURS) + list(synthetic.SHAPES) + list(synthetic.POSITIONS) + ["1", "2", "3", "4"]
  for _ in range(20):
    yield from answers  # each alone: an answer follows "assistant\n" with no space
  yield COMMON_WORDS
  yield COMMON_WORDS.title()


def build() -> str:
  """The tokenizer's JSON text, with ids laid out as the module docstring says."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus(), trainer)
  spec = json.loads(tok.to_str())
  learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
  table = byte_table()
  vocab = {table[b]: b for b in range(256)}
  vocab.update({t: 256 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)})
  for token, _ in learned:
    vocab.setdefault(token, len(vocab))
  spec["model"]["vocab"] = vocab
  for added in spec["added_tokens"]:
    added["id"] = vocab[added["content"]]
  return json.dumps(spec, ensure_ascii=False, indent=1) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="fail if the committed file differs from a rebuild")
  args = parser.parse_args()
  text = build()
  if args.check:
    with open(BUILTIN_PATH, encoding="utf-8") as f:
      same = f.read() == text
    print(f"{BUILTIN_PATH}: {'up to date' if same else 'DIFFERS from a rebuild'}")
    sys.exit(0 if same else 1)
  with open(BUILTIN_PATH, "w", encoding="utf-8") as f:
    f.write(text)
  n = len(json.loads(text)["model"]["vocab"])
  print(f"wrote {BUILTIN_PATH} ({n} ids, {os.path.getsize(BUILTIN_PATH)} bytes)")


if __name__ == "__main__":
  main()
