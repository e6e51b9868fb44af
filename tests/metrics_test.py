"""Ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest

from privjax.run import metrics


def test_ranks_hand_computed():
  scores = np.array([[0.9, 0.1, 0.5, 0.7, 0.3],
                     [0.2, 0.4, 0.6, 0.8, 1.0]])
  target = np.array([2, 0])
  exclude = np.array([[0, -1], [3, 4]])
  # Row 0: item 0 excluded; 0.7 beats 0.5 -> rank 1. Row 1: 3, 4 excluded;
  # 0.4, 0.6 beat 0.2 -> rank 2.
  assert np.asarray(metrics.ranks(scores, target, exclude)).tolist() == [1, 2]


def test_target_is_never_excluded_and_ties_count_against_the_model():
  scores = np.zeros((1, 6))
  r = metrics.ranks(scores, np.array([3]), np.array([[3, 0]]))
  assert int(r[0]) == 4  # 5 remaining items tie with the target: worst rank


def test_nan_scores_count_against_the_model():
  scores = np.array([[0.5, np.nan, 0.1]])
  assert int(metrics.ranks(scores, np.array([0]), np.array([[-1]]))[0]) == 1


def test_hit_rate_and_ndcg_values():
  ranks = np.array([0, 1, 4, 9, 10, 50])
  hr, ndcg = metrics.hit_rate_ndcg(ranks, k=10)
  assert hr == pytest.approx(4 / 6)
  expected = (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 6
  assert ndcg == pytest.approx(expected)
  hr5, _ = metrics.hit_rate_ndcg(ranks, k=5)
  assert hr5 == pytest.approx(3 / 6)


def test_sampled_ranks_only_count_sampled_unseen_negatives():
  scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
  # target item 3 (score 2); items 0, 1 excluded as seen. Unseen negatives:
  # items 2 (better), 4, 5 (worse). Sampling all 3 -> rank 1.
  r = metrics.sampled_ranks(scores, np.array([3]), np.array([[0, 1]]), 3, seed=0)
  assert r.tolist() == [1]
