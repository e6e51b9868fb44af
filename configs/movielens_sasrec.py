"""SASRec on MovieLens 100k with user-level DP-SGD.

Command (ml-100k raw files in ../shared/data/ml-100k):

  python scripts/train.py --config configs/movielens_sasrec.py

Non-private twin: add --config.privacy.enabled=false (same sampling, same
step, no clipping and no noise). Other epsilons: --config.privacy.target_epsilon=E.

A causal transformer over item ids (2 blocks, d=32, 1 head, window 50,
input and output item tables tied), full-softmax cross-entropy at every
position of each user's most recent window of 50 items; each user is one
privacy unit (one window, all its positions clipped together), Poisson-
sampled with q = 256 / (DP count of users), 300 steps, sigma calibrated to epsilon 8 at
delta = 1e-4 (about 0.1 / N). Small and tied because DP noise grows with the number of
noised coordinates and ml-100k has only 943 users. Evaluation: leave-last-
out, full ranking of the last item against every unseen item.

Expected on ml-100k (seed 0): DP at epsilon 8 test HR@10 ~0.10-0.11 against
popularity 0.084 (measured before the run-secret change; see
studies/privacy_utility/README.md for the current table and
mean +- std over seeds. The strongest non-private SASRec we ran (d=64,
untied, dropout 0.3, lr 1e-3, 600 steps: --config.privacy.enabled=false
--config.model.embed_dim=64 --config.model.hidden_dim=64
--config.model.tie_embeddings=false --config.model.dropout=0.3
--config.train.learning_rate=1e-3 --config.train.steps=600) reaches test
HR@10 0.154 +- 0.003 / NDCG@10 0.078 (seeds 0-2).
"""

from privjax import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="movielens_sasrec",
      data=config_lib.DataConfig(source="movielens", path="../shared/data/ml-100k",
                                 max_len=50, max_examples_per_user=1),
      model=config_lib.ModelConfig(name="sasrec", embed_dim=32, hidden_dim=32,
                                   num_layers=2, num_heads=1, dropout=0.0,
                                   tie_embeddings=True),
      privacy=config_lib.PrivacyConfig(enabled=True, unit="user", target_epsilon=8.0,
                                       delta=1e-4, l2_clip_norm=1.0, clipping="auto"),
      train=config_lib.TrainConfig(steps=300, batch_size=256, learning_rate=3e-3,
                                   log_every=25, eval_every=100, checkpoint_every=100),
      compare_baselines=False,
  )
