"""privjax.serve (scripts/recommend.py) on tiny synthetic run directories (DP-SGD, PATE)."""

import json
import pathlib
import re

import pytest

from privjax import config as config_lib
from privjax import pate
from privjax import serve as recommend
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib
from privjax.data import sequences



def _cfg(**overrides):
  cfg = config_lib.Config(
      name="tiny-rec",
      data=config_lib.DataConfig(num_users=150, num_items=40, mean_interactions=8,
                                 max_len=4, max_examples_per_user=4),
      model=config_lib.ModelConfig(embed_dim=4, hidden_dim=8),
      # A given sigma and one step: no calibration, one compile of the DP step.
      privacy=config_lib.PrivacyConfig(noise_multiplier=1.0, sampling_prob=0.2),
      train=config_lib.TrainConfig(steps=1, batch_size=32, learning_rate=1e-2,
                                   log_every=1, checkpoint_every=0),
      eval=config_lib.EvalConfig(batch_size=64))
  return config_lib.replace(cfg, **overrides)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dp")
  train_lib.train_and_evaluate(_cfg(), workdir, show_progress=False)
  return workdir


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pate")
  cfg = _cfg(**{"privacy.enabled": False, "privacy.noise_multiplier": None,
                "train.batch_size": 8, "train.steps": 3})
  pate.train_ensemble(cfg, pate.PateConfig(num_teachers=3, public_users=tuple(str(u) for u in range(1, 11))), workdir)
  return workdir


@pytest.fixture(scope="module")
def catalogue():
  w = workload_lib.build_workload(_cfg())
  return w.ds, sequences.leave_last_out(w.ds)


def _run(capsys, *argv):
  rc = recommend.main([str(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def _listed(out: str) -> list[str]:
  return re.findall(r"^\s+\d+\. (.+)$", out, flags=re.M)


def test_dp_run_recommends_unseen_titles_at_no_extra_cost(dp_run, catalogue, capsys):
  ds, split = catalogue
  rc, out, _ = _run(capsys, "--workdir", dp_run, "--user", ds.raw_user_ids[7], "--k", 5)
  assert rc == 0
  titles = _listed(out)
  assert len(titles) == 5 and set(titles) <= set(ds.item_titles)
  seen_titles = {ds.item_titles[i] for i in split.sequences[7]}
  assert not set(titles) & seen_titles
  privacy = json.loads((dp_run / "privacy.json").read_text())
  assert "No extra noise is needed" in out
  assert f"privacy cost of this answer: 0 beyond training" in out
  assert f"{privacy['epsilon']:.4g}" in out and "one user" in out


def test_history_titles_match_case_insensitively_and_are_excluded(dp_run, catalogue,
                                                                  capsys):
  ds, _ = catalogue
  chosen = [ds.item_titles[3], ds.item_titles[11]]
  text = f"{chosen[0].upper()};  {chosen[1].lower()} "
  rc, out, _ = _run(capsys, "--workdir", dp_run, "--history", text, "--k", 4)
  assert rc == 0
  titles = _listed(out)
  assert len(titles) == 4 and not set(titles) & set(chosen)
  assert "2 items seen" in out


def test_unknown_title_or_user_is_a_clear_error(dp_run, catalogue, capsys):
  ds, _ = catalogue
  rc, out, err = _run(capsys, "--workdir", dp_run, "--history",
                      f"{ds.item_titles[0]}; Nope The Movie (1999)")
  assert rc == 2 and "unknown title 'Nope The Movie (1999)'" in err and not _listed(out)
  rc, _, err = _run(capsys, "--workdir", dp_run, "--user", "no-such-user")
  assert rc == 2 and "unknown user 'no-such-user'" in err
  # A near miss gets a suggestion.
  typo = ds.item_titles[3][:-8] + "x" + ds.item_titles[3][-7:]
  rc, _, err = _run(capsys, "--workdir", dp_run, "--history", typo)
  assert rc == 2 and "did you mean" in err and repr(ds.item_titles[3]) in err


def test_the_year_may_be_left_out_when_unambiguous(catalogue):
  ds, _ = catalogue
  title = ds.item_titles[5]
  bare = re.sub(r"\s*\(\d{4}\)$", "", title)
  same = [i for i, t in enumerate(ds.item_titles)
          if re.sub(r"\s*\(\d{4}\)$", "", t).casefold() == bare.casefold()]
  if len({ds.item_titles[i] for i in same}) == 1:
    assert recommend.items_of_titles(bare, ds.item_titles) == same
  titles = ("Alpha (1990)", "Alpha (1995)", "Beta (1990)")
  with pytest.raises(recommend.QueryError, match="ambiguous"):
    recommend.items_of_titles("alpha", titles)
  assert recommend.items_of_titles("beta; ALPHA (1995)", titles) == [2, 1]


def test_pate_answers_state_their_cost_and_the_session_refuses_past_budget(
    ensemble_dir, catalogue, capsys):
  ds, _ = catalogue
  rc, out, _ = _run(capsys, "--workdir", ensemble_dir, "--queries", 6, "--k", 3,
                    "--mechanism", "gumbel", "--epsilon", 1, "--budget", 2.5, "--seed", 0)
  assert rc == 0
  titles = _listed(out)
  # Pure accounting: two answers of epsilon 1 fit in 2.5, the third is refused.
  assert len(titles) == 6 and set(titles) <= set(ds.item_titles)
  assert out.count("privacy cost of this answer: epsilon=1 (pure DP)") == 2
  assert "session total epsilon=2 of budget 2.5" in out
  assert "query 3:" in out and "REFUSED" in out and "query 4:" not in out
  assert "answered 2 of 6 queries" in out and "The answers above stand" in out
  assert "teachers are not private" in out


def test_pate_gnmax_session_file_uses_rdp_and_names_bad_lines(ensemble_dir, catalogue,
                                                              tmp_path, capsys):
  ds, _ = catalogue
  good = tmp_path / "good.jsonl"
  good.write_text(json.dumps({"user": ds.raw_user_ids[2]}) + "\n\n" +
                  json.dumps({"history": ds.item_titles[1]}) + "\n")
  rc, out, _ = _run(capsys, "--workdir", ensemble_dir, "--session", good, "--k", 2,
                    "--mechanism", "gnmax", "--epsilon", 2, "--seed", 1)
  assert rc == 0 and len(_listed(out)) == 4
  assert out.count("(epsilon=2, delta=1e-05)-DP") >= 2
  assert "answered 2 of 2 queries" in out and "rdp" in out
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"user": ds.raw_user_ids[2]}) + "\n" +
                 json.dumps({"history": "Unheard Of (1901)"}) + "\n")
  rc, _, err = _run(capsys, "--workdir", ensemble_dir, "--session", bad)
  assert rc == 2 and f"{bad}:2: unknown title 'Unheard Of (1901)'" in err


@pytest.mark.slow  # one more trainer run and compile
def test_non_private_run_is_served_with_a_warning(tmp_path, capsys):
  cfg = _cfg(**{"privacy.enabled": False, "privacy.noise_multiplier": None})
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  rc, out, _ = _run(capsys, "--workdir", tmp_path, "--user", "1", "--k", 2)
  assert rc == 0 and len(_listed(out)) == 2
  assert "NON-PRIVATE" in out and "no guarantee" in out
