"""The training config shared by configs/moe.py and configs/dense.py.

Every field the rest of the project relies on lives here, with its default; presets only change the model and
a few sizes. `None` in a hardware-dependent field means "let the hardware overlay decide" (qwen3vl/hardware.py),
so anything set on the command line wins over the overlay.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from qwen3vl.configs import models



def training_config(preset: str, *, tiny: bool) -> ml_collections.ConfigDict:
  # Optional fields are typed placeholders (None by default) so the command line can still set them.
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.hardware = "auto"  # auto | cpu | gpu | tpu
  # The weights to start from: a HF Qwen3-VL directory or a train.py work directory (its architecture replaces
  # the preset's; its tokenizer.json is used unless `tokenizer` is set). init_from_hf: the older name.
  c.init_from = placeholder(str)
  c.init_from_hf = placeholder(str)
  c.tokenizer = placeholder(str)  # a HF tokenizer.json; None = init_from's, else the built-in byte-level tokenizer

  # LoRA (qwen3vl/model/lora.py): rank 0 = full fine-tuning. Only the adapters train and are checkpointed; the
  # base stays frozen as `base`: float32, bfloat16, or int8 / nf4 codes (QLoRA; needs init_from). targets:
  # names or groups of qwen3vl.model.lora: all (every projection of the vision tower, mergers and decoder, and the
  # experts: PEFT's "all-linear"; the tiny digits task needs the vision side: 0.83 exact match against 0.56 with
  # llm), llm (decoder projections and experts), attention, mlp, experts, vision, merger, q_proj, ...
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.dropout = 0.0
  c.lora.targets = "all"
  c.lora.base = "bfloat16"

  c.model = models.get_config(preset)
  c.model.dtype = placeholder(str)  # compute dtype; overlay: float32 on CPU, bfloat16 on GPU/TPU
  c.model.param_dtype = "float32"  # master weights stay float32
  c.model.scan_layers = placeholder(bool)  # layers in a scan; overlay: unrolled on CPU, scanned on GPU/TPU
  c.model.attention_impl = placeholder(str)  # None = kernels.attention picks; or xla, pallas_gpu, pallas_tpu, triton, cudnn
  c.model.moe_impl = placeholder(str)  # ragged (grouped matmul), blocked (padded blocks) or dense; overlay: ragged on TPU, blocked on CPU and GPU
  # With an expert mesh axis: all_to_all (each copy goes once to its expert's device; ragged all-to-all on GPU/TPU,
  # a padded dense one on CPU) or all_gather (each device gets the expert group's token copies). capacity_factor
  # (all_to_all): a device receives at most this x its own token copies, the rest dropped (train/moe_dropped);
  # 0 = dropless, whose receive buffer is sized for every copy of the expert group.
  c.model.moe_dispatch = "all_to_all"
  c.model.moe_capacity_factor = 0.0
  c.model.vision_block_size = 128  # block-sparse vision attention over per-image blocks; 0 = segment-masked
  # Rematerialization presets (qwen3vl/model/remat.py): none, full, dots_with_no_batch_dims, minimal,
  # minimal_offload, custom (per tag: c.model.remat_custom = "q_proj:offload,attention:device"). Overlay: none
  # on CPU, full on GPU/TPU; `python -m qwen3vl.tools.memory` shows what each costs for a given config.
  c.model.remat = placeholder(str)
  c.model.vision_remat = placeholder(str)
  c.model.remat_custom = ""
  # Early exit while decoding (infer.py): after these decoder layers a token whose top next-token probability
  # exceeds exit_threshold skips the rest. 1.0 = never (exact).
  c.model.exit_layers = ()
  c.model.exit_threshold = 1.0
  # Per-part compute precision over model.dtype: "vision=bfloat16,decoder=float8,head=float32" (float8: e4m3
  # matmuls with per-tensor scales, float32 accumulation; emulated on CPU). "" = model.dtype everywhere.
  c.model.precision = ""
  # Vision-token merging (qwen3vl/model/token_merge.py): the fraction of each frame's visual tokens the LLM
  # sees (similar neighbours merged). 1.0 = off (exact).
  c.model.vision_token_ratio = 1.0

  c.data = ml_collections.ConfigDict()
  c.data.train_path = placeholder(str)  # LLaVA/ShareGPT JSONL; None = built-in synthetic visual QA
  c.data.eval_path = placeholder(str)
  c.data.batch_size = 8 if tiny else 64  # tiny: small batches learn the synthetic set fastest per second
  c.data.max_length = 128 if tiny else 4096
  c.data.max_patches = 768 if tiny else 64 * 4096  # vision patches per batch (fixed shape)
  c.data.pack = True
  c.data.image_size = 64  # synthetic images (pixels)
  c.data.synthetic_train_size = 20000
  c.data.synthetic_eval_size = 256
  c.data.min_pixels = 32 * 32 if tiny else 65536
  c.data.max_pixels = 64 * 64 if tiny else 16384 * 32 * 32
  c.data.prefetch = 2

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3 if tiny else 1e-5
  c.optim.min_lr_ratio = 0.1
  c.optim.warmup_steps = 30 if tiny else 200
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 1
  # Learning-rate multipliers by parameter group (0 freezes the group).
  c.optim.lr_mult = ml_collections.ConfigDict({"vision": 1.0, "merger": 1.0, "llm": 1.0})

  c.loss = ml_collections.ConfigDict()
  c.loss.aux_loss_coef = 0.001  # MoE load balancing (HF's router_aux_loss_coef)
  c.loss.z_loss_coef = 0.001  # router z-loss
  # > 0: cross-entropy over vocabulary chunks of this size: no [tokens, vocab] logits (20 GB for 32k tokens at
  # the released vocabulary), the dominant temporary of a full-size train step without it.
  c.loss.vocab_chunk = 0 if tiny else 16384

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2500 if tiny else 10000  # tiny: 1500 missed 0.9 exact match on 2 of 4 runs; 2500 did not
  c.train.eval_every = 500 if tiny else 1000
  c.train.eval_batches = 16 if tiny else 50
  c.train.log_every = 10
  c.train.checkpoint_every = 500 if tiny else 1000
  c.train.keep_checkpoints = 2
  c.train.peak_tflops = placeholder(float)  # for the MFU estimate; None = from the device kind when known

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
  # Multi-host (qwen3vl/distributed.py): auto = join when a coordinator is given or the environment (SLURM, Open MPI,
  # TPU pods, GKE) shows several processes; every process runs the same command.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = "auto"  # auto | yes | no
  c.distributed.coordinator = placeholder(str)  # host:port of process 0
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)
  c.distributed.initialization_timeout_s = 300  # give up joining after this long
  c.distributed.heartbeat_timeout_s = 100  # a peer silent this long fails the run (no hang)
  # Host offload: the optimizer state lives in pinned host memory between steps and is moved in for the update.
  c.offload = ml_collections.ConfigDict({"optimizer_state": False})
  return c


def post_training_config(arg: str, algorithm: str) -> ml_collections.ConfigDict:
  """SFT's config with the `rl` fields of post-training (qwen3vl/train/posttrain.py), shared by grpo.py and
  dpo.py: one answer a row (no packing), `rows_per_prompt` rows per prompt."""
  tiny = arg.startswith("tiny")
  c = training_config(arg, tiny=tiny)
  # One image a row at most: the vision budget per row is the largest image (max_pixels over 16 x 16 patches),
  # capped at SFT's per-row budget. Padding patches cost as much as real ones (6x the step time on the tiny task
  # with SFT's budget).
  patches_per_row = min(c.data.max_pixels // 16**2, c.data.max_patches // c.data.batch_size)
  c.rl = ml_collections.ConfigDict()
  c.rl.algorithm = algorithm
  c.rl.rewards = "exact_match"  # names registered in qwen3vl/train/rewards.py, comma-separated: summed
  c.rl.prompts = 16  # prompts per step
  c.rl.group = 8  # answers sampled per prompt (G)
  c.rl.updates = 1  # updates per step's rows (GRPO: the first is on-policy; later ones clip the ratio)
  c.rl.max_new_tokens = 8 if tiny else 256  # the synthetic answers are a word and <|im_end|>
  c.rl.temperature = 1.0
  c.rl.top_p = 1.0
  c.data.pack = False
  if tiny:
    c.data.max_length = 48  # the synthetic prompts are 18-24 tokens, + 8 answer tokens
  c.data.max_patches = c.data.get_ref("batch_size") * patches_per_row
  if tiny:
    c.optim.lr = 1e-3
  c.optim.warmup_steps = 100 if tiny else 20
  c.train.steps = 1500 if tiny else 1000  # tiny: about 15 minutes on 2 CPU cores
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.log_every = 5
  return c
