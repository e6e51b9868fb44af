"""PATE teachers on MovieLens 100k, and the DP-SGD model they are compared with.

Command (ml-100k raw files in ../shared/data/ml-100k; the whole study):

  python studies/private_inference/study.py --config configs/movielens_pate.py

then serve either kind of model:

  python scripts/recommend.py --workdir runs/private_inference/ensemble --user 42 \\
      --mechanism gumbel --epsilon 1
  python scripts/recommend.py --workdir runs/private_inference/dpsgd_eps8 --user 42

``get_config()`` is the model and its training: the embedding+MLP next-item
model over the last 10 items (the cheapest model on a CPU), each user keeping
16 training examples. It is used three ways, always with these sizes: as the
architecture of every PATE teacher (trained WITHOUT noise on one user shard,
``train.steps`` steps with ``train.batch_size`` expected users of its shard per
step), and, with ``single_model_overrides()``, as the single model trained on
all users without privacy and with user-level DP-SGD at each epsilon of the
study (delta = 1e-5).

``get_pate_config()``: 50 teachers over disjoint shards of the private users
(about 17 users each, by a keyed hash of the user id) and the users with ids
1-100 held out as public, standing for users who opted in (their histories
feed the student and the public candidate pool). More teachers mean larger
vote counts against the same noise; 50 tiny teachers train together in about
a minute here.

Expected (measured before the run-secret change; the table is in
studies/private_inference/README.md): at
epsilon 1-8 spread over 100 or 1000 answers, the ensemble's noisy top-10 over
the whole catalogue is at chance level (HR@10 ~0.006), 0.03-0.04 inside a
public pool of 100 items; the DP-SGD model answers any number of queries for
free at HR@10 0.075-0.077 (epsilon 1-8), the non-private twin 0.065, the
student 0.047 (epsilon 8), popularity 0.084. About 10 minutes on a shared
2-core CPU.
"""

from privjax import config as config_lib
from privjax import pate


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="movielens_pate",
      data=config_lib.DataConfig(source="movielens", path="../shared/data/ml-100k",
                                 max_len=10, max_examples_per_user=16),
      model=config_lib.ModelConfig(name="mlp", embed_dim=16, hidden_dim=64),
      # The teachers ignore this section (they are not private); the study sets
      # the DP-SGD model's epsilon and delta itself.
      privacy=config_lib.PrivacyConfig(enabled=False, unit="user", clipping="auto"),
      train=config_lib.TrainConfig(steps=50, batch_size=8, learning_rate=3e-3,
                                   log_every=25, checkpoint_every=0),
  )


def single_model_overrides() -> dict[str, object]:
  """How the single models (non-private and DP-SGD) train: all users at once."""
  return {"train.steps": 200, "train.batch_size": 256, "train.learning_rate": 1e-2}


def get_pate_config() -> pate.PateConfig:
  # Users 1-100 stand for users who opted in: their histories are public
  # (chosen by id, never by looking at the data).
  return pate.PateConfig(num_teachers=50, public_users=tuple(str(u) for u in range(1, 101)))
