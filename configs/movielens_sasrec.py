"""SASRec on MovieLens 100k with user-level DP-SGD.

Command (ml-100k raw files in ../shared/data/ml-100k):

  python scripts/train.py --config configs/movielens_sasrec.py

Non-private twin: add --config.privacy.enabled=false (same sampling, same
step, no clipping and no noise). Other epsilons: --config.privacy.target_epsilon=E.

A causal transformer over item ids (2 blocks, d=64, 1 head, window 50),
full-softmax cross-entropy at every position of each user's most recent
windows; each user is one privacy unit (at most 4 windows of 50 items,
clipped together), Poisson-sampled with q = 128/943. Evaluation: leave-last-
out, full ranking of the last item against every unseen item.

Expected on ml-100k (seed 0; see the README "Recommendation on MovieLens"
table for mean +- std over seeds): non-private HR@10 ~0.07-0.10 after 300
steps; DP at epsilon 8 lower; both against popularity HR@10 0.0838.
"""

from privjax import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="movielens_sasrec",
      data=config_lib.DataConfig(source="movielens", path="../shared/data/ml-100k",
                                 max_len=50, max_examples_per_user=4),
      model=config_lib.ModelConfig(name="sasrec", embed_dim=64, hidden_dim=64,
                                   num_layers=2, num_heads=1, dropout=0.0),
      privacy=config_lib.PrivacyConfig(enabled=True, unit="user", target_epsilon=8.0,
                                       l2_clip_norm=1.0, clipping="auto"),
      train=config_lib.TrainConfig(steps=300, batch_size=128, learning_rate=3e-3,
                                   log_every=25, eval_every=100, checkpoint_every=100),
      compare_baselines=False,
  )
