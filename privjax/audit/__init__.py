"""Privacy auditing: empirical lower bounds on epsilon, and canaries that reach them.

Pure estimators (no trainer import): ``stats`` (beta quantiles, Clopper-Pearson,
binomial tails), ``bounds`` (many-run distinguishing bound, Gaussian DP,
membership-inference metrics), ``one_run`` (Steinke, Nasr & Jagielski 2023).
Canaries: ``step`` (white-box gradient canaries through ``dp.step.make_step``),
``planted`` (the broken steps an audit must flag), ``inference`` (noisy argmax,
top-k and GNMax answers), ``canaries`` (synthetic users through the real
trainer, and a loss-based membership attack on real users). ``report`` runs one
audit kind for ``scripts/audit.py`` and writes ``audit.json`` / ``audit.md``.
"""
